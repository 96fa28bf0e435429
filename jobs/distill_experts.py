"""Ray job: distil one expert per language (+ baselines) from the teacher, all in parallel on Ray Train.

    ray job submit --working-dir . -- python -m jobs.distill_experts --config configs/small.yaml [key=value ...]
"""

import sys

from mome_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(['distill', *sys.argv[1:]]))
