"""Sequence-level language router: text -> en / fr / de / py / ... or `unknown`.

    from mome_ray.router import load_router
    r = load_router("runs/small/router")
    r.predict(["def f(x):", "Bonjour"])          # -> ["py", "fr"]

`mome router` trains the configured pipeline; `mome sweep router` sweeps features x classifiers with
Ray Tune and keeps the best. Modules: features, token_ngrams (the token-id n-gram TF-IDF), token_ids (text
-> token ids, BPE once per pre-token), classifiers, model (Router, RouterConfig), store (safe save/load),
examples (windows from the corpus), evaluate (hard cases), shift (the held-out-source set), sweep (Ray Tune).
"""

from mome_ray.router.model import UNKNOWN, Router, RouterConfig
from mome_ray.router.store import load_router, save_router

__all__ = ["UNKNOWN", "Router", "RouterConfig", "load_router", "save_router"]
