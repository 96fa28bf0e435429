"""Ray job: train JEET and MoE-CE with KD, assemble PLE, run the evaluation grid.

    ray job submit --working-dir . -- python -m jobs.train_moe --config configs/small.yaml [key=value ...]
"""

import sys

from mome_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(['moe', *sys.argv[1:]]))
