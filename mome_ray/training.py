"""Pieces every training loop shares: optimizer, schedule, one step, per-language eval, progress, state.

The loops themselves (`teacher.py`, ...) read top to bottom; these are the parts that must not be
written twice. Nothing here imports Ray: eval all-reduces through `torch.distributed` when it is up.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mome_ray.errors import MomeError


@dataclass
class TrainConfig:
    batch_size: int = 16  # sequences per worker per step, shared equally by the languages (data.BalancedBatches)
    max_steps: int = 500  # optimizer steps
    lr: float = 1e-3  # the paper: 5e-5 for its 0.34B teacher; small models train faster with more
    warmup_frac: float = 0.05  # linear warmup over this share of steps, then linear decay to 0
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    eval_every: int = 100  # steps between validation runs (and checkpoints)
    eval_blocks: int = 64  # validation blocks per language
    log_every: int = 20  # steps between progress lines
    keep_checkpoints: int = 2
    bf16: bool = True  # autocast to bfloat16 on GPU (ignored on CPU)

    def __post_init__(self):
        for name in ("batch_size", "max_steps", "eval_every", "eval_blocks", "log_every"):
            if getattr(self, name) < 1:
                raise MomeError(f"train.{name} must be at least 1, got {getattr(self, name)}")


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, LayerNorm weights and embeddings' 1-D params."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def build_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, int(cfg.warmup_frac * cfg.max_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (cfg.max_steps - step) / max(1, cfg.max_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of (B, T, V) logits on (B, T) ids, in float32."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction=reduction
    )


def clip_and_step(model, opt, sched, grad_clip: float) -> float:
    """Clip gradients, step optimizer and schedule, zero grads; returns the pre-clip grad norm."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")


def lm_train_step(model, opt, sched, ids: torch.Tensor, cfg: TrainConfig, device: torch.device) -> float:
    """One language-modelling optimizer step on (B, T) ids; returns the loss."""
    with autocast(device, cfg.bf16):
        loss = lm_loss(model(input_ids=ids).logits, ids)
    loss.backward()
    clip_and_step(model, opt, sched, cfg.grad_clip)
    return loss.item()


@torch.no_grad()
def evaluate(model, blocks_by_lang: dict[str, np.ndarray], device, batch_size: int, bf16: bool) -> dict[str, float]:
    """Mean next-token loss per language over this rank's eval blocks, summed across ranks."""
    was_training = model.training
    model.eval()
    out = {}
    for lang, blocks in blocks_by_lang.items():
        total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, token count)
        for i in range(0, len(blocks), batch_size):
            ids = torch.from_numpy(blocks[i : i + batch_size].astype("int64")).to(device)
            with autocast(device, bf16):
                logits = model(input_ids=ids).logits
            total[0] += lm_loss(logits, ids, reduction="sum").double()
            total[1] += ids[:, 1:].numel()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
        out[lang] = float(total[0] / total[1].clamp(min=1))
    model.train(was_training)
    return out


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


class Progress:
    """Prints `step i/n, loss, tokens/s, ETA` lines; tokens/s counts training time only."""

    def __init__(self, name: str, total: int, tokens_per_step: int, every: int, enabled: bool = True):
        self.name, self.total, self.every, self.enabled = name, total, every, enabled
        self.tokens_per_step = tokens_per_step
        self.train_seconds = 0.0
        self.steps_timed = 0
        self._t = None

    def tick(self) -> None:
        self._t = time.perf_counter()

    def tock(self, step: int, values: dict[str, float]) -> None:
        self.train_seconds += time.perf_counter() - self._t
        self.steps_timed += 1
        if self.enabled and ((step + 1) % self.every == 0 or step + 1 == self.total):
            sps = self.steps_timed / max(self.train_seconds, 1e-9)
            eta = (self.total - step - 1) / max(sps, 1e-9)
            vals = "  ".join(f"{k} {v:.4f}" for k, v in values.items())
            print(f"[{self.name}] step {step + 1}/{self.total}  {vals}  "
                  f"{self.tokens_per_s:,.0f} tok/s  ETA {eta // 60:.0f}m{eta % 60:02.0f}s", flush=True)

    @property
    def tokens_per_s(self) -> float:
        return self.steps_timed * self.tokens_per_step / max(self.train_seconds, 1e-9)


def save_state(path: Path, opt, sched, step: int, history: list[dict], **extra) -> None:
    """Optimizer, schedule, step, eval history and any loop-specific `extra` state, in train_state.pt."""
    torch.save({"optimizer": opt.state_dict(), "schedule": sched.state_dict(), "step": step, "history": history,
                **extra}, Path(path) / "train_state.pt")


def read_state(path: Path) -> dict:
    """The train_state.pt in checkpoint folder `path`, every tensor on CPU: rank 0 may have saved the
    optimizer state from a GPU this process does not have (a CPU-only driver, another rank's device)."""
    return torch.load(Path(path) / "train_state.pt", map_location="cpu", weights_only=True)


def load_state(path: Path, opt, sched) -> dict:
    """Restore optimizer + schedule in place; returns the whole state (step, history, extras).

    Read on CPU, then `load_state_dict` moves each optimizer state tensor to its parameter's device (this
    rank's), keeping Adam's `step` counters on CPU as torch does.
    """
    state = read_state(path)
    opt.load_state_dict(state.pop("optimizer"))
    sched.load_state_dict(state.pop("schedule"))
    return state


def eval_metrics(step: int, val: dict[str, float]) -> dict:
    """Flat metrics of one evaluation: val_loss/<lang>, val_ppl/<lang> and their means."""
    m = {"step": step, "val_loss": sum(val.values()) / len(val)}
    m["val_ppl"] = perplexity(m["val_loss"])
    for lang, loss in val.items():
        m[f"val_loss/{lang}"] = loss
        m[f"val_ppl/{lang}"] = perplexity(loss)
    return m


def process_device() -> torch.device:
    """Where this Ray process's models belong: the GPU Ray gave it (a Serve replica or an evaluation task with
    `num_gpus`, whole or a fraction), else the CPU. Ray sets CUDA_VISIBLE_DEVICES to the GPUs it gave, so the device index is the
    GPU's position in that list (the same rule `ray.train.torch.get_device` applies to Train ranks)."""
    import ray

    gpu_ids = [str(i) for i in ray.get_gpu_ids()] if ray.is_initialized() else []
    if not gpu_ids or not torch.cuda.is_available():
        return torch.device("cpu")
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    return torch.device(f"cuda:{visible.index(gpu_ids[0]) if gpu_ids[0] in visible else 0}")
