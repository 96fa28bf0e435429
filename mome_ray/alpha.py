"""How the distillation loss mixes its two terms: L = α·CE + β·KD.

    fixed        α given, β = 1 − α
    adaptive     the paper's "differential weights", updated once per optimizer step (PAPER.md)
    alternating  CE alone on even optimizer steps, KD alone on odd ones

Adaptive rule, over a window of the last k values (k = max(20, total_steps/100)) of each loss history h:
d = h[-1] − h[-k]; n = d / mean(h[-k:]) (0 if the mean is 0); w = 1 − clamp(n, 0, 1). A falling loss
keeps full weight, a rising one is down-weighted; α = w_CE / (w_CE + w_KD). Until k values exist, and when
both weights are 0 (the paper's code divides by zero there), α keeps its previous value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mome_ray.errors import MomeError


@dataclass
class AlphaConfig:
    strategy: Literal["fixed", "adaptive", "alternating"] = "fixed"
    alpha: float = 0.5  # the fixed α, and the adaptive rule's starting α (the paper: 0.5)
    min_window: int = 20  # adaptive: k = max(min_window, total_steps / 100)

    def __post_init__(self):
        if not 0 <= self.alpha <= 1:
            raise MomeError(f"alpha.alpha must be in [0, 1], got {self.alpha}")


def window(total_steps: int, min_window: int) -> int:
    return max(min_window, total_steps // 100)


def check_adapts(cfg: AlphaConfig, total_steps: int, where: str) -> None:
    """An adaptive α whose window is not shorter than the run never moves: that run is the fixed-α run by
    construction, and comparing the two would measure nothing."""
    k = window(total_steps, cfg.min_window)
    if cfg.strategy == "adaptive" and k >= total_steps:
        raise MomeError(f"{where}: adaptive α over a window of {k} losses never updates in a run of {total_steps} "
                        f"steps (it would equal fixed α = {cfg.alpha}); set {where}.min_window below {total_steps}, "
                        f"or train longer")


def differential_weight(history: list[float], k: int) -> float:
    """w = 1 − clamp((h[-1] − h[-k]) / mean(h[-k:]), 0, 1)."""
    recent = history[-k:]
    mean = sum(recent) / len(recent)
    n = 0.0 if mean == 0 else (history[-1] - history[-k]) / mean
    return 1.0 - min(max(n, 0.0), 1.0)


class AlphaSchedule:
    """Gives (α, β) for each optimizer step; `update` feeds it that step's CE and KD losses."""

    def __init__(self, cfg: AlphaConfig, total_steps: int):
        self.cfg = cfg
        self.k = window(total_steps, cfg.min_window)
        self.alpha = cfg.alpha
        self.ce: list[float] = []
        self.kd: list[float] = []

    def weights(self, step: int) -> tuple[float, float]:
        if self.cfg.strategy == "alternating":
            return (1.0, 0.0) if step % 2 == 0 else (0.0, 1.0)
        return self.alpha, 1.0 - self.alpha

    def update(self, ce: float, kd: float) -> None:
        self.ce.append(ce)
        self.kd.append(kd)
        if self.cfg.strategy != "adaptive" or len(self.ce) < self.k:
            return
        w_ce, w_kd = differential_weight(self.ce, self.k), differential_weight(self.kd, self.k)
        if w_ce + w_kd > 0:
            self.alpha = w_ce / (w_ce + w_kd)

    def state_dict(self) -> dict:
        return {"alpha": self.alpha, "ce": self.ce[-self.k:], "kd": self.kd[-self.k:]}

    def load_state_dict(self, state: dict) -> None:
        self.alpha, self.ce, self.kd = state["alpha"], list(state["ce"]), list(state["kd"])
