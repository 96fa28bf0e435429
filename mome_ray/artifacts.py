"""The run directory: one folder per stage, each with `meta.json` and its resolved config.

    RUN_DIR/corpus/      data/ (HF datasets), manifest.json
    RUN_DIR/tokenizer/   HF tokenizer files, tokens/<split>/<lang>.npy
    RUN_DIR/teacher/     model.safetensors + config.json (AutoModelForCausalLM), tokenizer files
    RUN_DIR/teacher_logits/  <lang>/ (the teacher's top-k log-probs of the training blocks, `logit_cache`)
    RUN_DIR/experts/     <lang>/, nokd-<lang>/, multilingual/ (each a model artifact with its own meta.json),
                         eval.csv + eval.md, and meta.json of the whole stage (written last)
    RUN_DIR/router/      router.skops + router.json (mome_ray.router.load_router), confusion.png
    RUN_DIR/ray_results/ Ray Train / Tune runs (checkpoints), one folder per run name

RUN_DIR is a local folder, a shared mount or a URI (`storage.RunStore`). `meta.json` = {stage, config
(also as run_config.yaml), metrics, parents, versions, seed, created, files (sha256 of every file)}. The
next stage finds its inputs through `read_meta`, never by guessing paths. A stage is written in full
before its `meta.json` appears (`stage_writer`), so a failed or killed stage never leaves a half-written
artifact that reads as complete.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from mome_ray.errors import MomeError
from mome_ray.storage import RunStore, manifest

# The command that makes each stage, for error messages.
MAKES = {
    "corpus": "mome corpus build",
    "tokenizer": "mome tokenizer",
    "teacher": "mome teacher",
    "teacher_logits": "mome teacher-logits",
    "experts": "mome distill",
    "sweep_kd": "mome sweep kd",
    "router": "mome router",
    "moe": "mome moe",
    "forgetting": "mome forgetting",
}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("mome-ray", "torch", "ray", "transformers", "tokenizers", "datasets", "scikit-learn"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def as_store(run: RunStore | str | Path) -> RunStore:
    return run if isinstance(run, RunStore) else RunStore(run)


def read_meta(run: RunStore | str | Path, stage: str) -> dict:
    """The meta of `stage` in the run, or an error that says which command makes it."""
    store = as_store(run)
    meta = store.meta(stage)
    if meta is None:
        make = MAKES.get(stage.split("/")[0], f"mome {stage}")
        raise MomeError(f"no '{stage}' artifact in run dir '{store.location}'; run '{make} --config CONFIG' "
                        f"first (with the same run_dir)")
    return meta


def is_complete(run: RunStore | str | Path, stage: str, config: dict) -> bool:
    """True when `stage` has an artifact made with exactly `config` (the pipeline then skips it)."""
    meta = as_store(run).meta(stage)
    return meta is not None and meta["config"] == config


def stage_writer(run: RunStore | str | Path, stage: str, nested: bool = False):
    """A local folder to write `stage` into, published to the run's storage when complete."""
    return as_store(run).writer(stage, nested=nested)


def write_meta(out_dir: Path, stage: str, config: dict, metrics: dict, parents: dict[str, str], seed: int) -> dict:
    """Write `meta.json` (last, after everything else of the stage, listing its files) and the resolved config."""
    import yaml

    meta = {
        "stage": stage,
        "config": config,
        "metrics": metrics,
        "parents": parents,
        "versions": versions(),
        "seed": seed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out_dir / "run_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    meta["files"] = manifest(out_dir)  # what a node fetching the artifact downloads and checks
    tmp = out_dir / ".meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    tmp.replace(out_dir / "meta.json")  # atomic: a reader sees the old meta or the new one, never half
    return meta
