"""Where jobs run: connect to `RAY_ADDRESS` when set, else start a local, single-node Ray cluster.

Security: Ray's own services (GCS, raylet, workers, dashboard agent) listen on every interface whatever
the node IP says; only the dashboard and Serve's HTTP proxy are put on 127.0.0.1 here. Ray's token
authentication is what keeps other machines out: leave it on (never set `RAY_AUTH_MODE=disabled` outside a
test). `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` does NOT bind Ray to loopback; it only forbids other nodes
from joining, which suits the local cluster started here and is never set when connecting to RAY_ADDRESS.
Env vars are set before Ray starts so the raylet and all workers inherit them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mome_ray.errors import MomeError

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
    use_gpu: bool = False  # one GPU per worker; DDP over nccl instead of gloo

    def __post_init__(self):
        if self.num_workers < 1 or self.cpus_per_worker <= 0:
            raise MomeError("scaling.num_workers must be >= 1 and scaling.cpus_per_worker > 0")

    def ray(self):
        from ray.train import ScalingConfig

        return ScalingConfig(num_workers=self.num_workers, use_gpu=self.use_gpu,
                             resources_per_worker={"CPU": self.cpus_per_worker, **({"GPU": 1} if self.use_gpu else {})})


@dataclass
class RayConfig:
    storage_path: str = ""  # checkpoints and Train results; "" = RUN_DIR/ray_results. Use s3:// or NFS on a cluster
    max_failures: int = 2  # a dead worker restarts the run from its last checkpoint this many times
    num_cpus: int = 0  # CPUs of a local cluster (0 = all)


def init_ray(cfg: RayConfig | None = None, temp_dir: str | None = None) -> None:
    """Connect to the cluster at RAY_ADDRESS, or start a local one (dashboard on 127.0.0.1)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        for k, v in ENV.items():
            os.environ.setdefault(k, v)
        ray.init(log_to_driver=True)
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
    )


def storage_path(cfg: RayConfig, run_dir: Path) -> str:
    return cfg.storage_path or str((Path(run_dir) / "ray_results").resolve())


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
