"""Ray job: train the BPE tokenizer.

    ray job submit --working-dir . -- python -m jobs.train_tokenizer --config configs/small.yaml [key=value ...]
"""

import sys

from mome_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(['tokenizer', *sys.argv[1:]]))
