"""Save and load a router without pickle: skops with an explicit trusted-type list, checked by sha256.

    save_router(router, RUN_DIR / "router")
    router = load_router(RUN_DIR / "router")

Layout of the folder:
    router.skops   the fitted sklearn pipeline (skops format: loads only types it was told to trust)
    router.json    what wraps it: features, classes, unknown threshold, sha256 and size of router.skops
    tokenizer/     the HF tokenizer, when the features are token ids

A file whose sha256 or size differs from router.json (tampered with, truncated) is refused before skops
reads a byte of it; a file that asks for a type outside TRUSTED is refused too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mome_ray.errors import MomeError
from mome_ray.router.features import uses_tokens
from mome_ray.router.model import Router

FORMAT = 2  # 2: token_tfidf is TokenNgramTfidf (reads token ids), no longer a TfidfVectorizer over id strings
MODEL, INFO, TOKENIZER = "router.skops", "router.json", "tokenizer"

# Types skops does not trust by default that our pipelines contain, and nothing else.
TRUSTED = frozenset({
    "mome_ray.router.token_ngrams.TokenNgramTfidf",  # token_tfidf: ints, int64 arrays and a TfidfTransformer
    "scipy.sparse._csr.csr_matrix",  # KNN's stored training rows
    "sklearn.calibration._CalibratedClassifier",  # LinearSVC / Ridge calibration
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.tree._tree.Tree",  # RandomForest's trees
})


def model_bytes(router: Router) -> bytes:
    """The serialised pipeline (also how the sweep measures model size)."""
    import skops.io as sio

    return sio.dumps(router.pipeline, compression=8)  # zipfile.ZIP_DEFLATED


def save_router(router: Router, out_dir: Path) -> dict:
    """Write the router into `out_dir`; returns the contents of router.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = model_bytes(router)
    (out_dir / MODEL).write_bytes(data)
    if router.tokenizer is not None:
        router.tokenizer.save_pretrained(str(out_dir / TOKENIZER))
    info = {"format": FORMAT, "features": router.features, "classes": router.classes,
            "unknown_below": router.unknown_below, "batch_size": router.batch_size,
            "collapse_spaces": router.collapse_spaces,
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (out_dir / INFO).write_text(json.dumps(info, indent=2))
    return info


def load_router(path: Path) -> Router:
    """The router saved in folder `path` (e.g. RUN_DIR/router); a clear MomeError for anything off."""
    import skops.io as sio

    path = Path(path)
    if not (path / INFO).is_file() or not (path / MODEL).is_file():
        raise MomeError(f"no router in '{path}' (expected {INFO} and {MODEL}); run 'mome router --config CONFIG' "
                        f"or 'mome sweep router --config CONFIG' first")
    try:
        info = json.loads((path / INFO).read_text())
        expected, size, features = info["sha256"], info["bytes"], info["features"]
    except (ValueError, KeyError) as e:
        raise MomeError(f"'{path / INFO}' is damaged ({e}); re-create the router with 'mome router'") from None
    if info.get("format") != FORMAT:
        raise MomeError(f"router in '{path}' has format {info.get('format')}, this code reads {FORMAT}; retrain it")
    data = (path / MODEL).read_bytes()
    if len(data) != size or hashlib.sha256(data).hexdigest() != expected:
        raise MomeError(f"'{path / MODEL}' does not match its checksum in {INFO} ({len(data)} bytes, expected "
                        f"{size}): it was truncated or modified. Refusing to load it; retrain with 'mome router'")
    untrusted = set(sio.get_untrusted_types(data=data))
    if untrusted - TRUSTED:
        raise MomeError(f"'{path / MODEL}' holds types outside the trusted list: {sorted(untrusted - TRUSTED)}; "
                        f"refusing to load it")
    pipeline = sio.loads(data, trusted=sorted(untrusted))
    tokenizer = None
    if uses_tokens(features):
        from mome_ray.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(path / TOKENIZER)
    return Router(pipeline, features, tokenizer, info["unknown_below"], info["batch_size"],
                  info.get("collapse_spaces", False))  # absent in routers saved before it existed
