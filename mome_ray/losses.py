"""Knowledge-distillation divergences between student and teacher next-token distributions.

One core works on log-probabilities over a set of categories (the last dim): `DIVERGENCES[name](s, t)` gives
the per-position divergence of student log-probs `s` from teacher log-probs `t`. Two front ends feed it:
- `forward_kl(student_logits, teacher_logits, ...)` and its siblings: (B, T, V) logits of both models (online);
- `cached_kd(name, student_logits, rows, ...)`: the student's logits and the teacher's cached `TeacherRows`
  (its top-k log-probs, their ids and the log of the mass outside them; `logit_cache.py` stores them).
Both compute in float32 and return the mean over counted positions ((B, T) `mask`, 1 = count) of the
per-position divergence. With a temperature τ both distributions are softened by τ and the result is
scaled by τ² (Hinton et al.) so gradients keep their size.

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
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TAILS = ("bucket", "uniform")  # how a top-k cache stands in for the teacher's mass outside the tokens it stored


# --- the core: divergences between log-prob tensors over the last dim -------------------------------------


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ_v p (log p − log q) per position: (B, T). 0·log 0 counts as 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def _mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w·a + (1−w)·b), computed stably in log space."""
    return torch.logsumexp(torch.stack([log_a + math.log(weight_a), log_b + math.log1p(-weight_a)]), dim=0)


class _DenseKL(torch.autograd.Function):
    """KL between the student's log-probs s and a fixed teacher's t, both (B, T, V), per position (B, T), with
    its gradient written out (three passes over V instead of autograd's ten): the KD term of every step.

        reverse KL(p_S ‖ p_T) = Σ q (s − t)    ∂/∂s_v = q_v (s_v − t_v + 1)
        forward KL(p_T ‖ p_S) = Σ p (t − s)    ∂/∂s_v = −p_v   (0 where p_v = 0)
    """

    @staticmethod
    def forward(ctx, s, t, reverse: bool):
        ctx.reverse = reverse
        if reverse:
            q, d = s.exp(), s - t
            ctx.save_for_backward(q, d)
            return torch.linalg.vecdot(q, d)
        p = t.exp()
        ctx.save_for_backward(p)
        return torch.linalg.vecdot(p, (t - s).nan_to_num_(0.0, 0.0, 0.0))  # p = 0 where t = −inf: 0·log 0 = 0

    @staticmethod
    def backward(ctx, g):
        g = g[..., None]
        if ctx.reverse:
            q, d = ctx.saved_tensors
            return (d + 1).mul_(q).mul_(g), None, None
        (p,) = ctx.saved_tensors
        return p.neg().mul_(g), None, None


def _forward(s, t):
    return _DenseKL.apply(s, t, False) if not t.requires_grad else _kl(t, s)


def _reverse(s, t):
    return _DenseKL.apply(s, t, True) if not t.requires_grad else _kl(s, t)


def _jsd(s, t, beta: float = 0.5):
    if not 0 < beta < 1:
        raise ValueError(f"jsd beta must be in (0, 1), got {beta}")
    m = _mixture(t, s, beta)
    return beta * _kl(t, m) + (1 - beta) * _kl(s, m)


def _skew(s, t, skew: float = 0.1):
    if not 0 <= skew < 1:
        raise ValueError(f"skew_kl skew must be in [0, 1), got {skew}")
    return _kl(t, _mixture(t, s, skew) if skew > 0 else s)  # skew 0 is plain forward KL


DIVERGENCES = {"reverse_kl": _reverse, "forward_kl": _forward, "jsd": _jsd, "skew_kl": _skew}


def _reduce(per_position: torch.Tensor, mask: torch.Tensor | None, temperature: float) -> torch.Tensor:
    if mask is None:
        mean = per_position.mean()
    else:
        mask = mask.to(per_position.dtype)
        mean = (per_position * mask).sum() / mask.sum().clamp(min=1)
    return mean * temperature**2


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logits = logits.float()
    return F.log_softmax(logits / temperature if temperature != 1 else logits, dim=-1)  # ÷1 is a wasted pass


# --- online: both models' logits ---------------------------------------------------------------------------


def _online(name: str, student_logits, teacher_logits, mask=None, temperature: float = 1.0, **params):
    s, t = log_probs(student_logits, temperature), log_probs(teacher_logits, temperature)
    return _reduce(DIVERGENCES[name](s, t, **params), mask, temperature)


def forward_kl(student_logits, teacher_logits, mask=None, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_T ‖ p_S)."""
    return _online("forward_kl", student_logits, teacher_logits, mask, temperature)


def reverse_kl(student_logits, teacher_logits, mask=None, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_S ‖ p_T): the paper's KD loss."""
    return _online("reverse_kl", student_logits, teacher_logits, mask, temperature)


def jsd(student_logits, teacher_logits, mask=None, temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence with teacher weight β in (0, 1)."""
    return _online("jsd", student_logits, teacher_logits, mask, temperature, beta=beta)


def skew_kl(student_logits, teacher_logits, mask=None, temperature: float = 1.0, skew: float = 0.1) -> torch.Tensor:
    """Skew forward KL: KL(p_T ‖ λ·p_T + (1−λ)·p_S), λ = `skew` in [0, 1)."""
    return _online("skew_kl", student_logits, teacher_logits, mask, temperature, skew=skew)


KD_LOSSES = {"reverse_kl": reverse_kl, "forward_kl": forward_kl, "jsd": jsd, "skew_kl": skew_kl}


# --- cached: the teacher's top-k log-probs and its tail --------------------------------------------------


@dataclass
class TeacherRows:
    """The teacher's next-token distribution at (B, T) positions, as `logit_cache` stores it.

    logp:  (B, T, k) log-probs (temperature 1) of tokens `ids` (B, T, k); `ids` None means k = V, in id order
           (then they may be logits: they are renormalised)
    log_tail: (B, T) log of the mass outside `ids` (None with the full vocabulary)
    tail_ids, tail_logp: (B, T, m) tokens sampled from the tail (without replacement) and their log-probs
    """

    logp: torch.Tensor
    vocab: int
    ids: torch.Tensor | None = None
    log_tail: torch.Tensor | None = None
    tail_ids: torch.Tensor | None = None
    tail_logp: torch.Tensor | None = None

    @property
    def full(self) -> bool:
        return self.ids is None


def cached_kd(name: str, student_logits: torch.Tensor, rows: TeacherRows, mask=None, temperature: float = 1.0,
              tail: str = "bucket", **params) -> torch.Tensor:
    """`name`'s divergence of the student (logits (B, T, V)) from the teacher's cached rows.

    With the full vocabulary this is exactly the online loss. Otherwise the teacher is known exactly on the
    tokens the cache stored for a position, K: its top k, plus the m tail tokens it sampled ∝ p (without
    replacement) when `teacher_logits.tail_samples` > 0. `tail` says how the rest of the vocabulary, R, with
    the teacher's remaining mass p_R, stands in for the teacher's distribution there:
    - `bucket`: R is one extra category. The student's mass on R, q_R = Σ_{v∈R} q_v, is compared with p_R as
      if R were one token: divergences over |K| + 1 categories. It says nothing about how either model
      spreads its mass inside R (KD leaves that shape to CE); by the log-sum inequality it under-estimates
      the forward and reverse KL.
    - `uniform`: every token of R gets p_R / |R|: full-vocabulary divergences of that distribution. It also
      pulls the student's mass inside R towards flat, which the real teacher's is not.
    Softening by τ treats R as |R| equal tokens. `params` are the divergence's own (`beta` for jsd, `skew`
    for skew_kl).
    """
    return kd_of_log_probs(name, log_probs(student_logits, temperature), rows, mask, temperature, tail, **params)


def kd_of_log_probs(name: str, s: torch.Tensor, rows: TeacherRows, mask=None, temperature: float = 1.0,
                    tail: str = "bucket", **params) -> torch.Tensor:
    """`cached_kd` from the student's log-probs `s` at temperature τ (a KD step shares them with its CE at τ = 1)."""
    if rows.full:
        t = F.log_softmax(rows.logp.float() / temperature, dim=-1)
    else:
        known = _known(rows, temperature)
        if not known[-1]:  # every token is known
            t = _dense(*known, s.shape[-1])
        elif tail == "bucket":
            s, t = _bucket(s, *known)
        elif name in _SPARSE:  # the same divergence without building the (B, T, V) teacher
            return _reduce(_SparseKL.apply(s, *known, _SPARSE[name]), mask, temperature)
        else:
            t = _dense(*known, s.shape[-1])
    return _reduce(DIVERGENCES[name](s, t, **params), mask, temperature)


def _known(rows: TeacherRows, temperature: float):
    """The teacher as (log-probs (B, T, j) of the stored tokens `ids` (B, T, j), log-prob (B, T) of each of the
    n others if they shared the rest evenly, n), softened by τ (each token's log-prob / τ, renormalised)."""
    t, ids = rows.logp.float(), rows.ids.long()
    rest = rows.log_tail.float().clamp(min=-80.0)  # log p_tail; a zero tail would give 0·(−inf)
    if rows.tail_ids is not None:
        sampled = rows.tail_logp.float()
        rest = torch.log((rest.exp() - sampled.exp().sum(-1)).clamp(min=1e-30))  # fp16 rounding can overshoot
        t, ids = torch.cat([t, sampled], -1), torch.cat([ids, rows.tail_ids.long()], -1)
    n = rows.vocab - ids.shape[-1]
    if n == 0:
        return F.log_softmax(t / temperature, dim=-1), ids, torch.full_like(rest, float("-inf")), 0
    other = rest - math.log(n)  # each remaining token's share
    log_z = torch.logsumexp(torch.cat([t / temperature, (other / temperature + math.log(n))[..., None]], -1), -1)
    return t / temperature - log_z[..., None], ids, other / temperature - log_z, n


def _bucket(s, t, ids, other, n) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probs over the known tokens + one category for the rest: (B, T, j + 1) each."""
    s_known = s.gather(-1, ids)
    # log q_R = log(1 − Σ_known q): from the j known entries, no pass over V (in float64: good to q_R ≈ 1e-6)
    s_rest = (1 - s_known.double().exp().sum(-1, keepdim=True)).clamp(min=1e-12).log().float()
    return torch.cat([s_known, s_rest], -1), torch.cat([t, (other + math.log(n))[..., None]], -1)


def _dense(t: torch.Tensor, ids: torch.Tensor, other: torch.Tensor, n: int, vocab: int) -> torch.Tensor:
    """(B, T, V) teacher log-probs: `other` everywhere, `t` at `ids`."""
    return other[..., None].expand(*other.shape, vocab).clone().scatter_(-1, ids, t)


class _SparseKL(torch.autograd.Function):
    """KL between the student's log-probs s (B, T, V) and a teacher known at `ids` (log-probs t (B, T, j)) with
    log-prob `other` (B, T) for each of the n other tokens, per position: (B, T). Its gradient is written out
    (one pass over V) rather than left to autograd (some ten passes): a cached step should cost about a CE step.

        forward KL(p_T ‖ p_S) = Σ_known p (t − s) + Σ_others p_o (o − s_v)   needs only Σ_v s_v over V
        reverse KL(p_S ‖ p_T) = Σ_v q_v s_v − Σ_known q t − o · (1 − Σ_known q)
    """

    @staticmethod
    def forward(ctx, s, t, ids, other, n: int, reverse: bool):
        s_known = s.gather(-1, ids)
        ctx.reverse, ctx.vocab = reverse, s.shape[-1]
        if reverse:
            q, q_known = s.exp(), s_known.exp()
            ctx.save_for_backward(s, q, t, ids, other)
            return torch.linalg.vecdot(q, s) - (q_known * t).sum(-1) - other * (1 - q_known.sum(-1))
        p, p_other = t.exp(), other.exp()
        ctx.save_for_backward(p, ids, p_other)
        return (p * (t - s_known)).sum(-1) + n * p_other * other - p_other * (s.sum(-1) - s_known.sum(-1))

    @staticmethod
    def backward(ctx, g):
        g = g[..., None]
        if ctx.reverse:  # ∂/∂s_v = q_v (s_v + 1), and at known v also q_v (o − t_v)
            s, q, t, ids, other = ctx.saved_tensors
            grad = (s + 1).mul_(q)
            q_known = q.gather(-1, ids)
            grad.scatter_add_(-1, ids, q_known * (other[..., None] - t))
            return grad.mul_(g), None, None, None, None, None
        p, ids, p_other = ctx.saved_tensors  # ∂/∂s_v = −p_v: p_o for the others, p at known v
        grad = (-(p_other[..., None] * g)).expand(*p_other.shape, ctx.vocab).clone()
        grad.scatter_(-1, ids, -p * g)
        return grad, None, None, None, None, None


_SPARSE = {"forward_kl": False, "reverse_kl": True}  # divergence -> _SparseKL(reverse=...)


def online_rows(teacher_logits: torch.Tensor) -> TeacherRows:
    """A running teacher's (B, T, V) logits as full-vocabulary rows."""
    return TeacherRows(teacher_logits, teacher_logits.shape[-1])
