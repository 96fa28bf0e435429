"""Ray job: sweep the router's features x classifiers with Ray Tune; the best becomes RUN_DIR/router.

    ray job submit --working-dir . -- python -m jobs.sweep_router --config configs/small.yaml [key=value ...]
"""

import sys

from mome_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(['sweep', 'router', *sys.argv[1:]]))
