"""Ray job: run every stage in order.

    ray job submit --working-dir . -- python -m jobs.pipeline --config configs/small.yaml [key=value ...]
"""

import sys

from mome_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(['pipeline', *sys.argv[1:]]))
