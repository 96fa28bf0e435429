"""Ray job: train the language router and print its metrics.

    ray job submit --working-dir . -- python -m jobs.train_router --config configs/small.yaml [key=value ...]
"""

import sys

from mome_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(['router', *sys.argv[1:]]))
