"""Ray job: train the GPT-2 teacher on Ray Train.

    ray job submit --working-dir . -- python -m jobs.train_teacher --config configs/small.yaml [key=value ...]
"""

import sys

from mome_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(['teacher', *sys.argv[1:]]))
