"""The run directory: one folder per stage, each with `meta.json` and its resolved config.

    RUN_DIR/corpus/      data/ (HF datasets), manifest.json
    RUN_DIR/tokenizer/   HF tokenizer files, tokens/<split>/<lang>.npy
    RUN_DIR/teacher/     model.safetensors + config.json (AutoModelForCausalLM), tokenizer files
    RUN_DIR/experts/     <lang>/, nokd-<lang>/, multilingual/ (each a model artifact with its own meta.json),
                         eval.csv + eval.md, and meta.json of the whole stage (written last)
    RUN_DIR/router/      router.skops + router.json (mome_ray.router.load_router), confusion.png

`meta.json` = {stage, config (also as run_config.yaml), metrics, parents, versions, seed, created}. The next stage finds its inputs
through `read_meta`, never by guessing paths. A stage writes into a temporary sibling folder and swaps it
in only when complete, so a failed or killed stage never leaves a half-written artifact behind, and the
previous one stays intact until the new one is whole.
"""

from __future__ import annotations

import contextlib
import json
import platform
import shutil
import time
from pathlib import Path
from typing import Iterator

from mome_ray.errors import MomeError

# The command that makes each stage, for error messages.
MAKES = {
    "corpus": "mome corpus build",
    "tokenizer": "mome tokenizer",
    "teacher": "mome teacher",
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


def read_meta(run_dir: Path, stage: str) -> dict:
    """The meta of `stage` in `run_dir`, or an error that says which command makes it."""
    path = Path(run_dir) / stage / "meta.json"
    if not path.is_file():
        make = MAKES.get(stage, f"mome {stage}")
        raise MomeError(f"no '{stage}' artifact in run dir '{run_dir}'; run '{make} --config CONFIG' first "
                        f"(with the same run_dir)")
    return json.loads(path.read_text())


def is_complete(run_dir: Path, stage: str, config: dict) -> bool:
    """True when `stage` has an artifact made with exactly `config` (the pipeline then skips it)."""
    try:
        return read_meta(run_dir, stage)["config"] == config
    except MomeError:
        return False


@contextlib.contextmanager
def stage_writer(run_dir: Path, stage: str) -> Iterator[Path]:
    """Yield a temporary folder to write `stage` into; swap it in as RUN_DIR/stage on success."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final, tmp, old = run_dir / stage, run_dir / f".{stage}.tmp", run_dir / f".{stage}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not (tmp / "meta.json").is_file():
        raise RuntimeError(f"stage '{stage}' wrote no meta.json")  # a bug in the stage, not user error
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def write_meta(out_dir: Path, stage: str, config: dict, metrics: dict, parents: dict[str, str], seed: int) -> dict:
    """Write `meta.json` (last, after everything else of the stage) and the resolved config."""
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
    tmp = out_dir / ".meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    tmp.replace(out_dir / "meta.json")  # atomic: a reader sees the old meta or the new one, never half
    return meta
