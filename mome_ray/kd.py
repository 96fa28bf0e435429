"""The knowledge-distillation engine every KD run shares: the recipe, one α·CE + β·KD step, the loop.

    loss = α·CE + β·KD   (β = 1 − α; `alpha.py` decides α per step; `losses.py` holds the divergences)

Used by the distilled students (`distill.py`), JEET / MoE-CE (`moe_train.py`) and the KD sweep. The teacher is
one of two objects with the same interface (`train_limit(lang)`, `rows(ids, index) -> TeacherRows`):
- `OnlineTeacher` (`distill.teacher: online`): the frozen teacher runs under no_grad on every batch;
- `logit_cache.CachedTeacher` (`cached`): the rows the `teacher_logits` stage stored for these very blocks
  (students then train on the blocks the cache covers, `train_limit`).
CE, KD, α and β are kept for every step in the run's `trace`, and go into the artifact's metrics.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

from mome_ray.alpha import AlphaConfig, AlphaSchedule, check_adapts
from mome_ray.cluster import ScalingArgs
from mome_ray.errors import MomeError
from mome_ray.losses import KD_LOSSES, TeacherRows, kd_of_log_probs, log_probs, online_rows
from mome_ray.models import ModelConfig
from mome_ray.storage import RunStore
from mome_ray.training import Progress, TrainConfig, autocast, clip_and_step, eval_metrics, lm_loss


LOSS_PARAMS = {"jsd": ("jsd_beta", "beta"), "skew_kl": ("skew", "skew")}  # loss -> (recipe field, its argument)


@dataclass
class KDRecipe:
    """What every KD training run is configured by: the distilled students here and JEET / MoE-CE
    (`moe_train.MoEConfig`); `kd_train` reads these. `section` names the config section in errors."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingArgs = field(default_factory=lambda: ScalingArgs(num_workers=1, cpus_per_worker=1))
    alpha: AlphaConfig = field(default_factory=AlphaConfig)
    kd_loss: str = "reverse_kl"  # reverse_kl (the paper's stated loss), forward_kl, jsd, skew_kl
    temperature: float = 1.0  # softens both distributions in the KD term (with τ² scaling)
    jsd_beta: float = 0.5  # jsd: the teacher's weight β in the mixture, in (0, 1)
    skew: float = 0.1  # skew_kl: the teacher's share λ of the skewed student, in [0, 1)
    max_parallel: int = 0  # runs at once (0 = as many as the cluster fits)
    # online: run the teacher on every batch of every KD run; cached: read its log-probs from the `teacher_logits`
    # stage (computed once; 2x faster steps, but top-k KD loses quality: BENCHMARKS.md, "KD with cached teacher logits")
    teacher: Literal["online", "cached"] = "online"
    section: ClassVar[str] = "distill"

    def __post_init__(self):
        check_adapts(self.alpha, self.train.max_steps, f"{self.section}.alpha")
        if self.kd_loss not in KD_LOSSES:
            raise MomeError(f"{self.section}.kd_loss '{self.kd_loss}' is not one of {sorted(KD_LOSSES)}")
        if self.temperature <= 0:
            raise MomeError(f"{self.section}.temperature must be > 0, got {self.temperature}")
        if not 0 < self.jsd_beta < 1:
            raise MomeError(f"{self.section}.jsd_beta must be in (0, 1) (the teacher's weight in the JSD mixture; "
                            f"0.5 is the symmetric JSD), got {self.jsd_beta}")
        if not 0 <= self.skew < 1:
            raise MomeError(f"{self.section}.skew must be in [0, 1) (the teacher's share of the skewed student; "
                            f"0 is forward KL), got {self.skew}")

    def loss_params(self) -> dict:
        """The configured divergence's own parameters: β for jsd, λ for skew_kl, none for the KLs."""
        return {arg: getattr(self, key) for loss, (key, arg) in LOSS_PARAMS.items() if loss == self.kd_loss}

    def kd_fn(self):
        """The configured divergence, `losses.<kd_loss>` with this recipe's β (jsd) or λ (skew_kl)."""
        return functools.partial(KD_LOSSES[self.kd_loss], **self.loss_params())

    def unused_keys(self) -> tuple[str, ...]:
        """The loss parameters the configured loss does not read: left out of what an artifact depends on."""
        return tuple(key for loss, (key, _) in LOSS_PARAMS.items() if loss != self.kd_loss)


def kd_step(model, teacher, opt, sched, ids: torch.Tensor, index: tuple[np.ndarray, np.ndarray] | None, alpha: float,
            beta: float, kd_loss: str, temperature: float, train: TrainConfig, device: torch.device,
            kd_params: dict | None = None) -> tuple[float, float | None]:
    """One optimizer step of α·CE + β·KD on (B, T) ids; returns (CE, KD) (KD None without a teacher).
    `kd_params`: the divergence's own parameters (`KDRecipe.loss_params`).

    `index` = (language, block) of each row (`BalancedBatches.index`): where a cached teacher finds its rows.
    With β = 0 the KD term is computed for the log only (no_grad), so α = 1 is exactly CE training.
    """
    with autocast(device, train.bf16):
        logits = model(input_ids=ids).logits
        rows = None if teacher is None else teacher.rows(ids, index)
    if rows is None:
        ce, kd = lm_loss(logits, ids), None
    else:
        # Position t predicts token t+1 in both models; the last position has no target, like CE. At τ = 1 CE
        # reads the same student log-probs as KD (one log-softmax over the vocabulary, not two).
        s = log_probs(logits[:, :-1], temperature)
        ce = F.nll_loss(s.flatten(0, 1), ids[:, 1:].flatten()) if temperature == 1 else lm_loss(logits, ids)
        with torch.set_grad_enabled(beta > 0):
            kd = kd_of_log_probs(kd_loss, s, rows, temperature=temperature, tail=teacher.tail, **(kd_params or {}))
    loss = alpha * ce  # ×1.0 is exact: α = 1, β = 0 gives the same gradients as plain CE
    if kd is not None and beta > 0:
        loss = loss + beta * kd
    loss.backward()
    clip_and_step(model, opt, sched, train.grad_clip)
    return ce.item(), None if kd is None else kd.item()


class OnlineTeacher:
    """The frozen teacher, run on every batch: full-vocabulary rows, every training block available."""

    tail = "bucket"  # unused: online rows hold the whole vocabulary

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def train_limit(self, lang: str) -> int:
        return 0

    @torch.no_grad()
    def rows(self, ids: torch.Tensor, index=None) -> TeacherRows:
        return online_rows(self.model(input_ids=ids).logits[:, :-1])


def kd_teacher(cfg: KDRecipe, store: RunStore, langs: list[str], tok_dir, device: torch.device):
    """The teacher a KD run of `langs` reads, as `cfg.teacher` says (on this worker's node)."""
    if cfg.teacher == "cached":
        from mome_ray.logit_cache import CachedTeacher

        return CachedTeacher.load(store, langs, cfg.model.n_positions)
    from mome_ray.models import load_lm

    return OnlineTeacher(frozen_teacher(load_lm(store.fetch("teacher"), tok_dir), device, cfg.train.bf16))


def teacher_dtype(device: torch.device, bf16: bool) -> torch.dtype:
    """bf16 on CUDA when training autocasts to bf16 (half the teacher's memory; autocast ran it in bf16
    anyway), float32 otherwise (CPUs run bf16 matmuls slowly)."""
    return torch.bfloat16 if bf16 and device.type == "cuda" else torch.float32


def frozen_teacher(model: torch.nn.Module, device: torch.device, bf16: bool) -> torch.nn.Module:
    """The KD teacher: on `device`, in `teacher_dtype`, in eval mode, with no gradients."""
    return model.to(device=device, dtype=teacher_dtype(device, bf16)).eval().requires_grad_(False)


def new_trace() -> dict[str, list]:
    return {"step": [], "ce": [], "kd": [], "alpha": [], "beta": []}


def kd_train(run, batches, teacher, schedule: AlphaSchedule, cfg: KDRecipe, device, name: str, world: int,
             evaluate_fn, banner: str, route=None) -> None:
    """The KD loop every distilled model shares (students here, JEET / MoE-CE in `moe_train`).

    A resumed run gets its α schedule back; a fresh one is evaluated at step 0 (the untrained baseline)
    and rank 0 prints `banner`. Then from `run.step` to `cfg.train.max_steps`: α·CE + β·KD steps, the
    per-step trace (CE, KD, α, β), progress lines, and at every evaluation `evaluate_fn()` -> {lang: loss}
    reported with a checkpoint.
    `route(model, lang_index)` wraps the model per batch (the MoEs route each sequence to its stack).
    """
    from mome_ray.worker import report

    if run.resumed:
        schedule.load_state_dict(run.extra["alpha_state"])
    else:
        run.history = [eval_metrics(0, evaluate_fn())]
        run.extra = {"trace": new_trace()}
        if run.rank == 0:
            print(f"[{name}] {banner}, {cfg.train.max_steps} steps", flush=True)
    trace = run.extra["trace"]
    run.model.train()
    progress = Progress(name, cfg.train.max_steps, cfg.train.batch_size * cfg.model.n_positions * world,
                        cfg.train.log_every, run.rank == 0)
    for step in range(run.step, cfg.train.max_steps):
        ids, lang_index = batches.batch(step)
        model = route(run.model, lang_index.to(device)) if route else run.model
        alpha, beta = schedule.weights(step)
        progress.tick()
        ce, kd = kd_step(model, teacher, run.opt, run.sched, ids.to(device), batches.index(step), alpha, beta,
                         cfg.kd_loss, cfg.temperature, cfg.train, device, cfg.loss_params())
        if kd is not None:
            schedule.update(ce, kd)
        for key, value in zip(trace, (step + 1, ce, kd, alpha, beta)):
            trace[key].append(value)
        progress.tock(step, {"ce": ce, **({"kd": kd, "alpha": alpha} if kd is not None else {})})

        if (step + 1) % cfg.train.eval_every == 0 or step + 1 == cfg.train.max_steps:
            metrics = eval_metrics(step + 1, evaluate_fn())
            metrics.update(ce=ce, kd=kd if kd is not None else float("nan"), alpha=alpha, beta=beta,
                           tokens_per_s=progress.tokens_per_s)
            run.history.append(metrics)
            run.extra = {"trace": trace, "alpha_state": schedule.state_dict()}
            report(run, step + 1, metrics)


def check_teacher(cfg: KDRecipe, store: RunStore, langs: list[str]) -> None:
    """Before any KD run of `langs` starts: the teacher sees the student's whole block, and a cached teacher's
    logits exist for these languages and blocks, made by the current teacher."""
    from mome_ray.artifacts import read_meta

    teacher = read_meta(store, "teacher")
    context = teacher["config"]["teacher"]["model"]["n_positions"]
    if cfg.model.n_positions > context:
        raise MomeError(f"{cfg.section}.model.n_positions ({cfg.model.n_positions}) exceeds the teacher's context "
                        f"({context}); the teacher must see the student's whole block")
    if cfg.teacher == "cached":
        from mome_ray.logit_cache import check_cache

        check_cache(store, langs, cfg.model.n_positions, teacher["created"], cfg.section)
