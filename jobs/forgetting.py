"""Ray job: sequential vs balanced vs JEET vs separate-experts training, per-language forgetting.

    ray job submit --working-dir . -- python -m jobs.forgetting --config configs/small.yaml [key=value ...]
"""

import sys

from mome_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(['forgetting', *sys.argv[1:]]))
