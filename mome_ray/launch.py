"""Launching Ray Train runs from the driver: one run (`fit`), or many at once (`fit_many`).

    result, resumed = fit(train_fn, loop_config, scaling, ray_cfg, run_dir, "small-teacher", keep=2)
    fit_many([TrainJob("expert-fr", train_fn, cfg_fr, scaling), ...], ray_cfg, run_dir, on_done=export)

Each run has its own name under the storage path (the run's `ray_results/` by default: local, NFS or
s3:// alike), so its checkpoints and resume are its own. A run whose name and storage exist is resumed by
Ray Train V2 — wanted after a kill, not after a config change: `run_name` carries a fingerprint of the
config and the parents, so a change gives a new name.

Capacity. Nothing is refused on a snapshot of the cluster. `fit_many` runs as many `fit()`s at once as the
cluster's nodes have CPUs and GPUs for (fractional GPUs count: two 0.5-GPU students share a GPU; the Train
controller takes no CPU, only the workers do) and queues the rest, re-reading the nodes as runs finish so
a cluster that grew is used. A run that fits no node set the cluster has now waits, saying every ~30 s what it
waits for, up to `ray.wait_for_resources_s` (0 = forever), then fails with a MomeError naming what was
missing. On a cluster with an autoscaler nothing waits here: Train's placement group is the demand the
autoscaler scales up for, and Train refuses by itself a run bigger than the autoscaler's largest cluster.

Parallel runs are Ray tasks, not driver threads. Each `fit()` runs in a `num_cpus=0` task pinned to the
driver's node (where `on_done` exports). A thread blocked in `TorchTrainer.fit()` cannot be
interrupted, and Train V2 installs its own graceful Ctrl-C handler only in the main thread (Ray 2.60,
`DataParallelTrainer._register_sigint_handler`). A task runs on its worker's main thread, so on Ctrl-C the
driver `ray.cancel`s every running task: Ray interrupts the task's main thread, Train's handler aborts
that run (its workers stop, its placement group is freed); a task still alive after `STOP_GRACE_S` (or at
a second Ctrl-C) is killed with `force=True`, and its Train controller, owned by the task, dies with it
(Train's detached placement-group cleaner frees its resources). The checkpoints stay in storage: the same
command resumes every run from its last checkpoint. A single `fit()` in the main thread gets Train's own
handler directly.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mome_ray.cluster import RayConfig, ScalingArgs, sigint_kept, storage_path
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


STOP_GRACE_S = 20.0  # after Ctrl-C, how long a run may take to abort gracefully before its task is killed
POLL_S = 2.0  # how often the launcher looks at the cluster and its runs
SAY_EVERY_S = 30.0  # how often a waiting run says what it waits for


def run_resources(scaling: ScalingArgs) -> dict[str, float]:
    """Everything one run's workers hold together."""
    return {k: v * scaling.num_workers for k, v in scaling.per_worker().items()}


def times_fit(need: dict[str, float], have: dict[str, float]) -> int:
    """How many times `need` fits in `have` (resource name -> amount); a small epsilon absorbs float sums."""
    return min(int(have.get(k, 0) / v + 1e-9) for k, v in need.items() if v > 0)


def slots(scaling: ScalingArgs, nodes: list[dict[str, float]]) -> int:
    """How many runs of this size the nodes (one resources dict each) fit at once; 0 if not even one.

    A worker's bundle must fit on one node: 3 nodes of 2 CPUs fit no 4-CPU worker.
    """
    return sum(times_fit(scaling.per_worker(), node) for node in nodes) // scaling.num_workers


def describe(resources: dict[str, float]) -> str:
    """'4 CPUs + 1 GPUs' (CPU and GPU only: what runs ask for)."""
    return " + ".join(f"{resources.get(k, 0):g} {k}s" for k in ("CPU", "GPU") if k == "CPU" or resources.get(k))


def alive_nodes() -> list[dict[str, float]]:
    """The resources of every live node of the connected cluster."""
    import ray

    return [n["Resources"] for n in ray.nodes() if n["Alive"]]


def autoscaling() -> bool:
    """Whether the cluster has an autoscaler (its config names node types): then Ray's placement waits."""
    try:
        from ray._private.state import state  # what Train 2.60 itself reads (WorkerGroup's resource check)

        return bool(state.get_max_resources_from_cluster_config())
    except Exception:  # no autoscaler config, or an older GCS: treat the cluster as fixed
        return False


class RoomWatch:
    """Whether a run has room on the cluster yet; says every ~30 s what it waits for, fails past the limit."""

    def __init__(self, scaling: ScalingArgs, name: str, limit_s: float, log=print, clock=time.monotonic,
                 say_every_s: float = SAY_EVERY_S):
        self.scaling, self.name, self.limit_s, self.log, self.clock = scaling, name, limit_s, log, clock
        self.say_every_s, self.since, self.said = say_every_s, None, None

    def has_room(self, nodes: list[dict[str, float]], autoscaled: bool = False) -> bool:
        if autoscaled or slots(self.scaling, nodes) >= 1:
            self.since = None
            return True
        now = self.clock()
        self.since = now if self.since is None else self.since
        waited = now - self.since
        total = {k: sum(node.get(k, 0) for node in nodes) for k in ("CPU", "GPU")}
        sc = self.scaling
        want = f"{describe(run_resources(sc))} ({sc.num_workers} x {describe(sc.per_worker())})"
        have = f"{describe(total)} on {len(nodes)} node(s)"
        if self.limit_s and waited >= self.limit_s:
            raise MomeError(f"{self.name}: waited {waited:.0f}s for {want}; the cluster has {have}. Add nodes, lower "
                            f"scaling.num_workers / cpus_per_worker / gpus_per_worker, or raise "
                            f"ray.wait_for_resources_s (0 = wait forever)")
        if self.said is None or now - self.said >= self.say_every_s:
            self.said = now
            limit = f"{self.limit_s:g}s" if self.limit_s else "no limit"
            self.log(f"[launcher] waiting for {want} for {self.name} (cluster has {have}; waited {waited:.0f}s "
                     f"of {limit})")
        return False


def wait_for_room(scaling: ScalingArgs, name: str, limit_s: float, log=print, nodes=alive_nodes,
                  autoscaled=autoscaling, sleep=time.sleep, clock=time.monotonic) -> None:
    """Return once one run of this size fits the cluster (at once when it autoscales); see `RoomWatch`."""
    watch = RoomWatch(scaling, name, limit_s, log, clock)
    scales = autoscaled()
    while not watch.has_room(nodes(), scales):
        sleep(POLL_S)


def fit(train_fn, loop_config: dict, scaling: ScalingArgs, ray_cfg: RayConfig, run_dir: Path, name: str,
        keep: int, fresh: bool = False, callbacks: tuple = ()):
    """Run `train_fn` on Ray Train; returns (Result, resumed)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    wait_for_room(scaling, name, ray_cfg.wait_for_resources_s)
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
    with sigint_kept():  # Train's own handler aborts this run on Ctrl-C, then goes
        return trainer.fit(), resumed


def _fit_job(job: TrainJob, ray_cfg: RayConfig, run_dir: Path):
    """One job's `fit()`; the body of its Ray task."""
    return fit(job.train_fn, job.loop_config, job.scaling, ray_cfg, run_dir, job.name, job.keep, job.fresh)


def fit_many(jobs: list[TrainJob], ray_cfg: RayConfig, run_dir: Path, on_done: Callable = None,
             max_parallel: int = 0, log=print) -> dict[str, tuple]:
    """Run every job's `fit()` concurrently, as many at once as the cluster fits; the rest wait their turn.

    `on_done(job, result, resumed)` runs as each job finishes (e.g. to export its model), so a kill later
    loses nothing already done. Returns {name: (result, resumed)}; a failed job fails the call after the
    others have finished, naming it. Ctrl-C stops every running job (see the module docstring).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not jobs:
        return {}
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    task = ray.remote(num_cpus=0, max_retries=0)(_fit_job).options(scheduling_strategy=here)
    board = Board([job.name for job in jobs], log)
    queue, running = list(jobs), {}  # running: ObjectRef -> (job, start time)
    watches = {job.name: RoomWatch(job.scaling, job.name, ray_cfg.wait_for_resources_s, log) for job in jobs}
    scales = autoscaling()

    def width_on(nodes) -> int:  # runs at once: re-read as runs finish, so nodes that joined are used
        width = max(1, min(slots(job.scaling, nodes) for job in jobs))
        return min(width, max_parallel) if max_parallel else width

    log(f"[launcher] {len(jobs)} runs, {width_on(alive_nodes())} at a time on this cluster")
    out, failures = {}, []
    try:
        while queue or running:
            nodes = alive_nodes()
            width = width_on(nodes)
            while queue and len(running) < width:
                if not watches[queue[0].name].has_room(nodes, scales):
                    break
                job = queue.pop(0)
                running[task.remote(job, ray_cfg, run_dir)] = (job, time.perf_counter())
                board.show(job.name, "running")
            if not running:
                time.sleep(POLL_S)
                continue
            finished, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
            for ref in finished:
                job, t0 = running.pop(ref)
                try:
                    result, resumed = ray.get(ref)
                    if on_done:
                        on_done(job, result, resumed)
                except Exception as e:  # one failed run must not hide the others' results
                    board.show(job.name, "failed")
                    failures.append(f"{job.name}: {getattr(e, 'cause', None) or e}")
                    continue
                out[job.name] = (result, resumed)
                board.show(job.name, "done")
                log(f"[launcher] {job.name} finished in {time.perf_counter() - t0:.0f}s")
    except BaseException:  # Ctrl-C, or a run that waited too long: stop the others before giving up
        stop(list(running), [job.name for job, _ in running.values()], log)
        raise
    if failures:
        raise MomeError(f"{len(failures)} of {len(jobs)} runs failed:\n  " + "\n  ".join(failures))
    return out


def stop(refs: list, names: list[str], log=print, grace_s: float = STOP_GRACE_S) -> None:
    """Stop running `fit()` tasks: interrupt each (Train aborts its run), kill those still alive after `grace_s`."""
    import ray

    if not refs:
        return
    log(f"[launcher] stopping {', '.join(names)} (up to {grace_s:.0f}s; Ctrl-C again to kill them now)")
    for ref in refs:
        ray.cancel(ref)
    left = refs
    try:
        _, left = ray.wait(refs, num_returns=len(refs), timeout=grace_s)
    except KeyboardInterrupt:
        pass
    for ref in left:
        ray.cancel(ref, force=True)
    log("[launcher] stopped; run the same command again to resume from the last checkpoints")


class Board:
    """The launcher's status line: which runs are running, queued, done or failed."""

    def __init__(self, names: list[str], log=print):
        self.state, self.log = {name: "queued" for name in names}, log

    def show(self, name: str, what: str) -> None:
        self.state[name] = what
        groups = {w: [n for n, s in self.state.items() if s == w] for w in ("running", "queued", "done", "failed")}
        self.log("[launcher] " + "; ".join(f"{w}: {', '.join(ns)}" for w, ns in groups.items() if ns))


def export_checkpoint(result, out_dir: Path) -> dict:
    """Copy the final checkpoint's model files into `out_dir`; returns its training state (history, ...)."""
    from mome_ray.training import read_state

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as d:
        for f in Path(d).iterdir():
            if f.name != "train_state.pt":
                shutil.copy2(f, out_dir / f.name)
        state = read_state(Path(d))  # on CPU whatever device saved it
    return {k: v for k, v in state.items() if k not in ("optimizer", "schedule")}

