"""Launching Ray Train runs from the driver: one run (`fit`), or many at once (`fit_many`).

    result, resumed = fit(train_fn, loop_config, scaling, ray_cfg, run_dir, "small-teacher", keep=2)
    fit_many([TrainJob("expert-fr", train_fn, cfg_fr, scaling), ...], ray_cfg, run_dir, on_done=export)

Each run has its own name under the storage path (the run's `ray_results/` by default: local, NFS or
s3:// alike), so its checkpoints and resume are its own. A run whose name and storage exist is resumed by
Ray Train V2 — wanted after a kill, not after a config change: `run_name` carries a fingerprint of the
config and the parents, so a change gives a new name. `fit_many` runs as many `fit()`s
at once as the cluster has CPUs (GPUs) for and queues the rest: the Train controller takes no CPU, only
the workers do (DESIGN.md).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mome_ray.cluster import RayConfig, ScalingArgs, storage_path
from mome_ray.errors import MomeError
from mome_ray.storage import RunStore


@dataclass
class TrainJob:
    name: str  # the Ray Train run name: unique per model in a run directory
    train_fn: Callable[[dict], None]
    loop_config: dict
    scaling: ScalingArgs
    keep: int = 2  # checkpoints to keep
    fresh: bool = False  # ignore an interrupted run's checkpoints


def run_name(store: RunStore, model: str, loop_config: dict, parents: dict) -> str:
    """`<run>-<model>-<fingerprint>`: the fingerprint hashes the loop config (it names the run's storage) and
    the parents' stamps, so a changed config or a re-made parent starts a new Train run, never resumes an
    old one, on any filesystem; and two runs sharing a storage path never share checkpoints."""
    blob = json.dumps({"run": store.location, "config": loop_config, "parents": parents}, sort_keys=True)
    return f"{store.name}-{model}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def prepare_storage(storage: str, name: str, fresh: bool) -> bool:
    """Clear the run's checkpoints when `fresh`; returns True when an interrupted run will be resumed."""
    where = RunStore(storage)
    if fresh:
        where.delete(name)
        return False
    return where.exists(name)


def _resources(scaling: ScalingArgs) -> dict[str, float]:
    need = {"CPU": scaling.num_workers * scaling.cpus_per_worker}
    if scaling.use_gpu:
        need["GPU"] = float(scaling.num_workers)
    return need


def slots(scaling: ScalingArgs, name: str = "run") -> int:
    """How many runs of this size fit on the cluster at once; an error if not even one does."""
    import ray

    have = ray.cluster_resources()
    fits = [int(have.get(k, 0) // v) for k, v in _resources(scaling).items()]
    if min(fits) < 1:
        raise MomeError(f"{name}: {scaling.num_workers} workers x {scaling.cpus_per_worker} CPUs"
                        f"{' + 1 GPU each' if scaling.use_gpu else ''} does not fit the cluster "
                        f"({have.get('CPU', 0):g} CPUs, {have.get('GPU', 0):g} GPUs); lower scaling.num_workers "
                        f"or scaling.cpus_per_worker")
    return min(fits)


def fit(train_fn, loop_config: dict, scaling: ScalingArgs, ray_cfg: RayConfig, run_dir: Path, name: str,
        keep: int, fresh: bool = False, callbacks: tuple = ()):
    """Run `train_fn` on Ray Train; returns (Result, resumed)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    slots(scaling, name)
    storage = storage_path(ray_cfg, run_dir)
    resumed = prepare_storage(storage, name, fresh)
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=scaling.ray(),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep),
            callbacks=list(callbacks),
        ),
    )
    return trainer.fit(), resumed


def fit_many(jobs: list[TrainJob], ray_cfg: RayConfig, run_dir: Path, on_done: Callable = None,
             max_parallel: int = 0, log=print) -> dict[str, tuple]:
    """Run every job's `fit()` concurrently, as many at once as the cluster fits; the rest wait their turn.

    `on_done(job, result, resumed)` runs as each job finishes (e.g. to export its model), so a kill later
    loses nothing already done. Returns {name: (result, resumed)}; a failed job fails the call after the
    others have finished, naming it.
    """
    if not jobs:
        return {}
    # transformers resolves its names lazily, and two `on_done` threads importing one at once can fail
    # ("cannot import name 'AutoTokenizer'"): resolve the ones exports use here, once.
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    width = min(slots(job.scaling, job.name) for job in jobs)
    if max_parallel:
        width = min(width, max_parallel)
    state = {job.name: "queued" for job in jobs}
    lock = threading.Lock()

    def show(name: str, what: str) -> None:
        with lock:
            state[name] = what
            groups = {w: [n for n, s in state.items() if s == w] for w in ("running", "queued", "done", "failed")}
            log("[launcher] " + "; ".join(f"{w}: {', '.join(ns)}" for w, ns in groups.items() if ns))

    def one(job: TrainJob):
        show(job.name, "running")
        t0 = time.perf_counter()
        result, resumed = fit(job.train_fn, job.loop_config, job.scaling, ray_cfg, run_dir, job.name, job.keep,
                              job.fresh)
        if on_done:
            on_done(job, result, resumed)
        show(job.name, "done")
        return result, resumed, time.perf_counter() - t0

    log(f"[launcher] {len(jobs)} runs, {width} at a time on this cluster")
    out, failures = {}, []
    with ThreadPoolExecutor(max_workers=width, thread_name_prefix="fit") as pool:
        futures = {pool.submit(one, job): job for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            try:
                result, resumed, seconds = future.result()
                out[job.name] = (result, resumed)
                log(f"[launcher] {job.name} finished in {seconds:.0f}s")
            except Exception as e:  # one failed run must not hide the others' results
                show(job.name, "failed")
                failures.append(f"{job.name}: {e}")
    if failures:
        raise MomeError(f"{len(failures)} of {len(jobs)} runs failed:\n  " + "\n  ".join(failures))
    return out


def export_checkpoint(result, out_dir: Path) -> dict:
    """Copy the final checkpoint's model files into `out_dir`; returns its training state (history, ...)."""
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as d:
        for f in Path(d).iterdir():
            if f.name != "train_state.pt":
                shutil.copy2(f, out_dir / f.name)
        state = torch.load(Path(d) / "train_state.pt", weights_only=True)
    return {k: v for k, v in state.items() if k not in ("optimizer", "schedule")}
