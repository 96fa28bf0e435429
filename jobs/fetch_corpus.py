"""Ray job: fetch the Debian packages of the corpus sources.

    ray job submit --working-dir . -- python -m jobs.fetch_corpus --config configs/small.yaml [key=value ...]
"""

import sys

from mome_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(['corpus', 'fetch', *sys.argv[1:]]))
