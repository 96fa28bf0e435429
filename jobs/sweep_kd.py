"""Ray job: Ray Tune sweep over alpha strategy x KD loss x temperature (tune_spaces/kd.yaml).

    ray job submit --working-dir . -- python -m jobs.sweep_kd --config configs/small.yaml [key=value ...]
"""

import sys

from mome_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(['sweep', 'kd', *sys.argv[1:]]))
