"""Ray job: build the balanced corpus.

    ray job submit --working-dir . -- python -m jobs.build_corpus --config configs/small.yaml [key=value ...]
"""

import sys

from mome_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(['corpus', 'build', *sys.argv[1:]]))
