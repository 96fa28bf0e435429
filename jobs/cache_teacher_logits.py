"""Ray job: cache the teacher's top-k log-probs of every language's training blocks (one Ray task per language).

    ray job submit --working-dir . -- python -m jobs.cache_teacher_logits --config configs/small.yaml [key=value ...]
"""

import sys

from mome_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(['teacher-logits', *sys.argv[1:]]))
