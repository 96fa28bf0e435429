"""Where jobs run: connect to `RAY_ADDRESS` when set, else start a local, single-node Ray cluster.

Security: Ray's own services (GCS, raylet, workers, dashboard agent) listen on every interface whatever
the node IP says; only the dashboard and Serve's HTTP proxy are put on 127.0.0.1 here. Ray's token
authentication is what keeps other machines out: leave it on (never set `RAY_AUTH_MODE=disabled` outside a
test). `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` does NOT bind Ray to loopback; it only forbids other nodes
from joining, which suits the local cluster started here and is never set when connecting to RAY_ADDRESS.
Env vars are set before Ray starts so the raylet and all workers inherit them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from mome_ray.errors import MomeError
from mome_ray.storage import RunStore, is_uri

ENV = {  # set (unless already set) for every driver, local or connecting
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # else Train tees every print through its logger: lines twice
}
LOCAL_ENV = {  # only for a local cluster started by init_ray: no other node may join it
    **ENV,
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


@dataclass
class ScalingArgs:
    num_workers: int = 2  # Ray Train workers (DDP ranks)
    cpus_per_worker: float = 1.0  # also the torch thread count of each worker
    # GPUs per worker: 0 = CPU (DDP over gloo); 1 = a GPU each (nccl); a fraction (0.25, 0.5) lets small
    # single-worker runs, e.g. students, share one GPU; more than 1 must be whole GPUs (Ray's rule).
    gpus_per_worker: float = 0.0

    def __post_init__(self):
        if self.num_workers < 1 or self.cpus_per_worker <= 0:
            raise MomeError("scaling.num_workers must be >= 1 and scaling.cpus_per_worker > 0")
        g = self.gpus_per_worker
        if g < 0 or (g > 1 and g != int(g)):
            raise MomeError(f"scaling.gpus_per_worker must be 0 (CPU), a fraction of one GPU or a whole number "
                            f"of GPUs, got {g}")
        if 0 < g < 1 and self.num_workers > 1:
            raise MomeError(f"scaling.gpus_per_worker {g} with {self.num_workers} workers: DDP ranks sharing a GPU "
                            f"fail in NCCL; give each worker a whole GPU, or use 1 worker per run to share GPUs")

    def per_worker(self) -> dict[str, float]:
        """One worker's Ray resources: its placement-group bundle."""
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.gpus_per_worker else {})}

    def ray(self):
        from ray.train import ScalingConfig

        return ScalingConfig(num_workers=self.num_workers, use_gpu=self.gpus_per_worker > 0,
                             resources_per_worker=self.per_worker())


@dataclass
class RayConfig:
    storage_path: str = ""  # checkpoints and Train results; "" = RUN_DIR/ray_results (local, NFS or s3:// alike)
    max_failures: int = 2  # a dead worker restarts the run from its last checkpoint this many times
    num_cpus: int = 0  # CPUs of a local cluster (0 = all)
    task_cpus: float = 1  # CPUs of the Ray tasks doing a stage's heavy work (corpus, tokenizer, evaluation)
    task_gpus: float = 0  # GPUs of the evaluation tasks
    # How long a run waits for the cluster (or its autoscaler) to have room for its workers before it fails
    # (0 = forever). On an autoscaling cluster Ray's own placement waits instead.
    wait_for_resources_s: float = 600.0

    def __post_init__(self):
        if self.wait_for_resources_s < 0:
            raise MomeError(f"ray.wait_for_resources_s must be >= 0 (0 = wait forever), got {self.wait_for_resources_s}")


# What every Ray process of a job needs; on a real cluster it travels in the job's runtime_env (a worker
# started by another node's raylet does not inherit the driver's environment).
WORKER_ENV = ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS",
              "RAY_TRAIN_ENABLE_PRINT_PATCH")
# Where the run's storage is: forwarded when set on the driver (secrets belong on the nodes themselves).
STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION")


def worker_env() -> dict[str, str]:
    """The env vars the job's workers get through runtime_env (those the job's own runtime_env lacks)."""
    import json

    env = {k: os.environ.get(k, ENV[k]) for k in WORKER_ENV}
    env.update({k: os.environ[k] for k in STORAGE_ENV if os.environ.get(k)})
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
    return {k: v for k, v in env.items() if k not in (job.get("env_vars") or {})}


def in_ray_job() -> bool:
    """True inside a driver started by `ray job submit` (its working dir is a temporary, node-local copy)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def _remote_address(address: str) -> bool:
    host = address.split("://")[-1].rsplit(":", 1)[0]
    return address not in ("", "auto", "local") and host not in ("127.0.0.1", "localhost", "::1", "[::1]")


def resolve_run_dir(run_dir: str) -> RunStore:
    """The run's storage; a relative path is refused where other nodes or later jobs could not see it."""
    if is_uri(run_dir) or Path(run_dir).is_absolute():
        return RunStore(run_dir)
    address = os.environ.get("RAY_ADDRESS", "")
    if in_ray_job() or _remote_address(address):
        where = "inside a Ray job (its working dir is a temporary copy on one node)" if in_ray_job() else \
            f"against the remote cluster RAY_ADDRESS={address}"
        raise MomeError(f"run_dir '{run_dir}' is a relative path {where}: other nodes and later jobs cannot see "
                        f"it. Use a URI (run_dir=s3://bucket/runs/x, gs://...) or an absolute path on a mount "
                        f"every node shares (run_dir=/mnt/shared/runs/x)")
    return RunStore(run_dir)


def init_ray(cfg: RayConfig | None = None, temp_dir: str | None = None) -> None:
    """Connect to the cluster at RAY_ADDRESS, or start a local one (dashboard on 127.0.0.1)."""
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"env_vars": worker_env()}
    if os.environ.get("RAY_ADDRESS"):
        for k, v in ENV.items():
            os.environ.setdefault(k, v)
        ray.init(log_to_driver=True, runtime_env=runtime_env)
        return
    for k, v in LOCAL_ENV.items():
        os.environ.setdefault(k, v)
    # The dashboard (on 127.0.0.1) serves the state API that Train's placement-group cleaner needs: without
    # it, a Tune trial's finished TorchTrainer leaves its placement group behind and the next trial waits.
    ray.init(
        num_cpus=(cfg.num_cpus or None) if cfg else None,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        _temp_dir=temp_dir,
        runtime_env=runtime_env,
    )


def on_cluster(fn, *args, cpus: float = 1, gpus: float = 0, name: str = "", log=print):
    """`fn(*args, log=log)` as a Ray task holding `cpus`/`gpus` (heavy work stays off the driver's node, which
    may be a head with no CPUs); a local run without Ray calls it here. A task logs with `print` (its lines
    reach the driver); Ctrl-C cancels it."""
    return on_cluster_map(fn, [args], cpus=cpus, gpus=gpus, name=name, log=log)[0]


def on_cluster_map(fn, arg_lists: list[tuple], cpus: float = 1, gpus: float = 0, name: str = "", log=print) -> list:
    """`fn(*args, log=log)` for every `args` of `arg_lists`, as concurrent Ray tasks (as many at once as the
    cluster fits), like `on_cluster`; returns their results in order."""
    import ray

    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        return [fn(*args, log=log) for args in arg_lists]
    init_ray()
    task = ray.remote(_threaded).options(num_cpus=cpus, num_gpus=gpus, name=name or fn.__name__, max_retries=0)
    refs = [task.remote(fn, max(1, int(cpus)), *args) for args in arg_lists]
    try:
        return ray.get(refs)
    except KeyboardInterrupt:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise


def _threaded(fn, threads: int, *args):
    """A task's body: torch uses as many threads as the task holds CPUs (a pooled worker process may have
    started with one), then `fn(*args, log=print)` with the worker's own `print`. The driver never ships its
    `print`: Ray's log thread swaps `builtins.print` for tqdm_ray's on the first worker line it shows, and a
    built-in `print` read just before that swap can no longer be pickled."""
    import torch

    torch.set_num_threads(threads)
    return fn(*args, log=print)


def sigint_kept():
    """Put this process's SIGINT handler back after the block: Train V2's `fit()` and Tune's `Tuner.fit()`
    install their own in the main thread and leave it behind (Ray 2.60), so a later Ctrl-C in the same
    driver (e.g. during `fit_many` after the teacher) would only poke a finished run instead of interrupting."""
    return signals_kept(signal.SIGINT)


@contextlib.contextmanager
def signals_kept(*signums: int):
    """Put this process's Python handlers of `signums` back after the block (main thread only)."""
    handlers = {s: signal.getsignal(s) for s in signums}
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            for s, handler in handlers.items():
                signal.signal(s, handler)


def storage_path(cfg: RayConfig, run: RunStore) -> str:
    """Where Ray Train / Tune keep checkpoints: `ray.storage_path`, else the run's own `ray_results/`."""
    return cfg.storage_path or run.uri("ray_results")


def quiet_worker() -> None:
    """Silence per-report INFO lines and save progress bars in training workers; our progress lines remain."""
    import logging

    import transformers

    # Train V2 logs every report at INFO through loggers named by file path (Ray 2.60): mute those two.
    # These are Train internals, not an API: if a Ray release moves them, the lines come back and that is all.
    try:
        from ray.train.v2._internal.execution import context, storage

        context.logger.setLevel(logging.WARNING)
        storage.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):
        pass
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
