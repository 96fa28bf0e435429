"""Thin Ray job entry points: `python -m jobs.X --config ...`; the work is in mome_ray."""
