"""Where jobs run: connect to `RAY_ADDRESS` when set, else start a local Ray cluster on loopback.

Ray listens on every interface by default; `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` made every Ray
listener bind 127.0.0.1 on these machines (DESIGN.md). Env vars are set before Ray starts so the raylet
and all workers inherit them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mome_ray.errors import MomeError

LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # else Train tees every print through its logger: lines twice
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
    storage_path: str = ""  # checkpoints and Train results; "" = RUN_DIR/ray_results. Use s3:// or NFS on a cluster
    max_failures: int = 2  # a dead worker restarts the run from its last checkpoint this many times
    num_cpus: int = 0  # CPUs of a local cluster (0 = all)
    # How long a run waits for the cluster (or its autoscaler) to have room for its workers before it fails
    # (0 = forever). On an autoscaling cluster Ray's own placement waits instead.
    wait_for_resources_s: float = 600.0

    def __post_init__(self):
        if self.wait_for_resources_s < 0:
            raise MomeError(f"ray.wait_for_resources_s must be >= 0 (0 = wait forever), got {self.wait_for_resources_s}")


def init_ray(cfg: RayConfig | None = None, temp_dir: str | None = None) -> None:
    """Connect to the cluster at RAY_ADDRESS, or start a local one bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    for k, v in LOCAL_ENV.items():
        os.environ.setdefault(k, v)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
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
    from ray.train.v2._internal.execution import context, storage

    # Train V2 logs every report at INFO through loggers named by file path (Ray 2.60): mute those two.
    context.logger.setLevel(logging.WARNING)
    storage.logger.setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
