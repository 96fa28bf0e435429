"""Train a set of model artifacts on the cluster: plan -> queue -> export to storage -> meta.

    runs = [ModelRun("experts/fr", train_fn, loop, scaling, config=what_it_depends_on), ...]
    metas = train_models(store, runs, parents, ray_cfg, seed)        # {stage: meta}

A run whose artifact is up to date (made with the same config from the same parents) is skipped; the
others go to `launch.fit_many` (as many at once as the cluster fits, the rest queued; Ctrl-C stops them and
the same call resumes them) and each is exported to the run's storage as soon as it finishes: the final
checkpoint's files, the training state's metrics (final, untrained, history, the KD trace when the loop
keeps one) and a `meta.json` naming `parents`, which the caller declares once. Used by the experts
(`distill`), the MoE variants (`moe_train`) and the forgetting regimes (`forgetting`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mome_ray.artifacts import is_complete, read_meta, stage_writer, write_meta
from mome_ray.cluster import RayConfig, ScalingArgs
from mome_ray.launch import TrainJob, export_checkpoint, fit_many, run_name
from mome_ray.storage import RunStore


@dataclass
class ModelRun:
    stage: str  # the artifact it makes, e.g. "experts/fr"
    train_fn: Callable[[dict], None]  # the Ray Train worker loop
    loop_config: dict  # the loop's config (names the run's storage: never a driver path)
    scaling: ScalingArgs
    config: dict  # what the artifact depends on: a change re-trains it
    keep: int = 2  # checkpoints to keep
    extra: Callable[[Path], None] | None = None  # writes more files into the artifact (e.g. the tokenizer)
    parents: dict[str, str] | None = None  # its parents when only some of train_models' (None: all of them)


def train_models(store: RunStore, runs: list[ModelRun], parents: dict[str, str], ray_cfg: RayConfig, seed: int,
                 fresh: bool = False, max_parallel: int = 0, log=print) -> dict[str, dict]:
    """Train every run whose artifact is not up to date; returns {stage: meta} of every run."""
    todo: dict[str, ModelRun] = {}  # Train run name -> run
    for run in runs:
        if (not fresh and is_complete(store, run.stage, run.config)
                and read_meta(store, run.stage)["parents"] == _parents(run, parents)):
            log(f"[{run.stage.split('/')[0]}] {run.stage}: up to date in {store.uri(run.stage)}, skipped")
            continue
        todo[run_name(store, run.stage.replace("/", "-"), run.loop_config, _parents(run, parents))] = run

    def export(job: TrainJob, result, resumed: bool) -> None:
        run = todo[job.name]
        with stage_writer(store, run.stage) as out:
            state = export_checkpoint(result, out)
            if run.extra:
                run.extra(out)
            metrics = {"final": state["history"][-1], "untrained": state["history"][0],
                       "history": state["history"], "resumed": resumed}
            if "trace" in state:
                metrics["trace"] = state["trace"]
            write_meta(out, run.stage, run.config, metrics, _parents(run, parents), seed)

    jobs = [TrainJob(name, run.train_fn, run.loop_config, run.scaling, run.keep, fresh) for name, run in todo.items()]
    fit_many(jobs, ray_cfg, store, on_done=export, max_parallel=max_parallel, log=log)
    return {run.stage: read_meta(store, run.stage) for run in runs}


def _parents(run: ModelRun, parents: dict[str, str]) -> dict[str, str]:
    return parents if run.parents is None else run.parents
