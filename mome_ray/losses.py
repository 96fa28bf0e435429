"""Knowledge-distillation divergences between student and teacher next-token distributions.

Every function takes logits of shape (B, T, V) and an optional (B, T) mask (1 = count the position),
computes in float32, and returns the mean over counted positions of the per-position divergence summed
over the vocabulary. With a temperature τ both distributions are softened by τ and the result is scaled
by τ² (Hinton et al.) so gradients keep their size.

Names say what is computed (PAPER.md: the paper's public code calls −Σ p_T log p_S "inverse KL"; it is
the forward direction plus a constant):
    forward_kl  KL(p_T ‖ p_S)   mean-seeking: the student covers every teacher mode
    reverse_kl  KL(p_S ‖ p_T)   mode-seeking; the paper's stated KD loss and our default
    jsd         β·KL(p_T ‖ m) + (1−β)·KL(p_S ‖ m), m = β·p_T + (1−β)·p_S; /β → forward KL as β → 0,
                /(1−β) → reverse KL as β → 1
    skew_kl     KL(p_T ‖ λ·p_T + (1−λ)·p_S)   a forward KL that stays finite where p_S → 0
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ_v p (log p − log q) per position: (B, T). 0·log 0 counts as 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def _reduce(per_position: torch.Tensor, mask: torch.Tensor | None, temperature: float) -> torch.Tensor:
    if mask is None:
        mean = per_position.mean()
    else:
        mask = mask.to(per_position.dtype)
        mean = (per_position * mask).sum() / mask.sum().clamp(min=1)
    return mean * temperature**2


def forward_kl(student_logits, teacher_logits, mask=None, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_T ‖ p_S)."""
    s, t = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    return _reduce(_kl(t, s), mask, temperature)


def reverse_kl(student_logits, teacher_logits, mask=None, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_S ‖ p_T): the paper's KD loss."""
    s, t = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    return _reduce(_kl(s, t), mask, temperature)


def _mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w·a + (1−w)·b), computed stably in log space."""
    return torch.logsumexp(torch.stack([log_a + math.log(weight_a), log_b + math.log1p(-weight_a)]), dim=0)


def jsd(student_logits, teacher_logits, mask=None, temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence with teacher weight β in (0, 1)."""
    if not 0 < beta < 1:
        raise ValueError(f"jsd beta must be in (0, 1), got {beta}")
    s, t = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    m = _mixture(t, s, beta)
    return _reduce(beta * _kl(t, m) + (1 - beta) * _kl(s, m), mask, temperature)


def skew_kl(student_logits, teacher_logits, mask=None, temperature: float = 1.0, skew: float = 0.1) -> torch.Tensor:
    """Skew forward KL: KL(p_T ‖ λ·p_T + (1−λ)·p_S), λ = `skew` in [0, 1)."""
    if not 0 <= skew < 1:
        raise ValueError(f"skew_kl skew must be in [0, 1), got {skew}")
    s, t = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    m = _mixture(t, s, skew) if skew > 0 else s  # skew 0 is plain forward KL
    return _reduce(_kl(t, m), mask, temperature)


KD_LOSSES = {"reverse_kl": reverse_kl, "forward_kl": forward_kl, "jsd": jsd, "skew_kl": skew_kl}
