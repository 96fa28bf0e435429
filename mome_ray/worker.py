"""What every Ray Train worker loop does around its training step: set up, resume, evaluate, report.

    rank, world, device = worker_context(cpus_per_worker)
    run = start_run(build_model, train_cfg, name)        # fresh model, or the latest checkpoint's
    ... train from run.step ...
    report(run, step, metrics)                          # rank 0 attaches a checkpoint

A checkpoint is a plain `save_pretrained` folder (safetensors) plus `train_state.pt` (optimizer, schedule,
step, eval history and the loop's own extras), so the exported model loads in `AutoModelForCausalLM`.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from mome_ray.cluster import quiet_worker
from mome_ray.training import TrainConfig, build_optimizer, build_schedule, load_state, save_state


@dataclass
class Run:
    """A worker's training state: the (DDP-wrapped) model, optimizer, schedule and where it stands."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    rank: int
    step: int = 0  # the next optimizer step to run
    history: list[dict] = field(default_factory=list)  # one entry per evaluation
    extra: dict = field(default_factory=dict)  # loop-specific state saved with every checkpoint
    save: Callable[[torch.nn.Module, Path], None] | None = None  # writes the bare model (None: save_pretrained)

    @property
    def resumed(self) -> bool:
        return self.step > 0

    @property
    def module(self) -> torch.nn.Module:
        """The bare model (without the DDP wrapper)."""
        return getattr(self.model, "module", self.model)


def worker_context(cpus_per_worker: float) -> tuple[int, int, torch.device]:
    """(rank, world size, device); torch uses as many threads as the worker has CPUs."""
    import ray.train
    import ray.train.torch

    quiet_worker()
    ctx = ray.train.get_context()
    torch.set_num_threads(max(1, int(cpus_per_worker + 0.01)))  # + 0.01: a sweep trial's worker holds c − 0.001
    return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()


def start_run(build: Callable[[], torch.nn.Module], train: TrainConfig, name: str, seed: int,
              rank: int, load: Callable[[Path], torch.nn.Module] | None = None,
              save: Callable[[torch.nn.Module, Path], None] | None = None, ddp_kwargs: dict | None = None) -> Run:
    """Build the model (or load the latest checkpoint's), wrap it for DDP, make optimizer and schedule.

    An HF model needs none of `load`/`save`/`ddp_kwargs`; another model (JEET) passes how to read and write
    its checkpoint folder, and DDP options such as `find_unused_parameters`.
    """
    import ray.train
    import ray.train.torch

    torch.manual_seed(seed)
    checkpoint = ray.train.get_checkpoint()
    # as_directory(): the checkpoint itself when local, else a download shared by this node's ranks and
    # deleted after the last of them is done (a to_directory() copy deleted by one rank breaks the others).
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as d:
        ckpt_dir = Path(d) if d else None
        model = (load or _load_hf)(ckpt_dir) if ckpt_dir else build()
        model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_kwargs)
        opt = build_optimizer(model, train)
        sched = build_schedule(opt, train)
        run = Run(model, opt, sched, rank, save=save)
        if ckpt_dir:
            state = load_state(ckpt_dir, opt, sched)  # optimizer state onto this rank's device
            run.step, run.history = state.pop("step"), state.pop("history")
            run.extra = state
            if rank == 0:
                print(f"[{name}] resumed from step {run.step}", flush=True)
    return run


def _load_hf(ckpt_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(ckpt_dir))


def report(run: Run, step: int, metrics: dict) -> None:
    """Every rank reports; rank 0 attaches a checkpoint (weights in safetensors + training state)."""
    import ray.train

    if run.rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        if run.save:
            run.save(run.module, Path(d))
        else:
            run.module.save_pretrained(d)
        save_state(Path(d), run.opt, run.sched, step, run.history, **run.extra)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
