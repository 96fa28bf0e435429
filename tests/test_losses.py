"""KD losses against naive references and torch's kl_div; masking, temperature, limits of the JSD."""

import math

import pytest
import torch
import torch.nn.functional as F

from mome_ray.losses import KD_LOSSES, forward_kl, jsd, reverse_kl, skew_kl

torch.manual_seed(0)
S = torch.randn(2, 5, 7) * 2  # student logits (B, T, V)
Tt = torch.randn(2, 5, 7) * 2  # teacher logits


def naive_kl(p_logits, q_logits, tau=1.0):
    """KL(p ‖ q) per position with explicit loops, averaged over positions."""
    total, n = 0.0, 0
    for b in range(p_logits.shape[0]):
        for t in range(p_logits.shape[1]):
            p = torch.softmax(p_logits[b, t].double() / tau, -1)
            q = torch.softmax(q_logits[b, t].double() / tau, -1)
            total += sum(float(p[v] * (math.log(p[v]) - math.log(q[v]))) for v in range(p.shape[0]))
            n += 1
    return total / n * tau**2


def test_forward_and_reverse_kl_match_naive_reference():
    assert forward_kl(S, Tt).item() == pytest.approx(naive_kl(Tt, S), rel=1e-5)
    assert reverse_kl(S, Tt).item() == pytest.approx(naive_kl(S, Tt), rel=1e-5)
    assert forward_kl(S, Tt, temperature=2.0).item() == pytest.approx(naive_kl(Tt, S, 2.0), rel=1e-5)


def test_directions_match_torch_kl_div_with_arguments_in_the_right_order():
    # F.kl_div(input=log q, target=log p, log_target=True) is KL(p ‖ q) summed; divide by positions.
    ls, lt = F.log_softmax(S, -1), F.log_softmax(Tt, -1)
    positions = S.shape[0] * S.shape[1]
    fwd = F.kl_div(ls, lt, log_target=True, reduction="sum") / positions  # KL(p_T ‖ p_S)
    rev = F.kl_div(lt, ls, log_target=True, reduction="sum") / positions  # KL(p_S ‖ p_T)
    assert forward_kl(S, Tt).item() == pytest.approx(fwd.item(), rel=1e-5)
    assert reverse_kl(S, Tt).item() == pytest.approx(rev.item(), rel=1e-5)


@pytest.mark.parametrize("name", sorted(KD_LOSSES))
def test_divergence_of_a_distribution_with_itself_is_zero(name):
    assert KD_LOSSES[name](S, S).item() == pytest.approx(0.0, abs=1e-6)
    assert KD_LOSSES[name](S, Tt).item() > 0


def test_the_two_kls_differ_on_asymmetric_inputs():
    assert abs(forward_kl(S, Tt).item() - reverse_kl(S, Tt).item()) > 1e-3


@pytest.mark.parametrize("name", sorted(KD_LOSSES))
def test_masked_positions_do_not_change_the_result(name):
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    garbage_s, garbage_t = S.clone(), Tt.clone()
    garbage_s[1, 3:] = torch.randn(2, 7) * 50
    garbage_t[1, 3:] = torch.randn(2, 7) * 50
    fn = KD_LOSSES[name]
    assert fn(garbage_s, garbage_t, mask).item() == pytest.approx(fn(S, Tt, mask).item(), rel=1e-6)
    kept = torch.cat([S[0], S[1, :3]])[None], torch.cat([Tt[0], Tt[1, :3]])[None]
    assert fn(S, Tt, mask).item() == pytest.approx(fn(*kept).item(), rel=1e-5)


def test_jsd_tends_to_the_two_kls_at_its_ends():
    assert (jsd(S, Tt, beta=1e-4) / 1e-4).item() == pytest.approx(forward_kl(S, Tt).item(), rel=1e-2)
    assert (jsd(S, Tt, beta=1 - 1e-4) / 1e-4).item() == pytest.approx(reverse_kl(S, Tt).item(), rel=1e-2)
    assert jsd(S, Tt).item() <= math.log(2) + 1e-6  # the symmetric JSD is bounded by ln 2


def test_skew_kl_interpolates_and_bad_parameters_are_refused():
    assert skew_kl(S, Tt, skew=0.0).item() == pytest.approx(forward_kl(S, Tt).item(), rel=1e-6)
    assert 0 < skew_kl(S, Tt, skew=0.5).item() < forward_kl(S, Tt).item()
    with pytest.raises(ValueError):
        jsd(S, Tt, beta=0.0)
    with pytest.raises(ValueError):
        skew_kl(S, Tt, skew=1.0)


def test_losses_are_float32_and_differentiable_from_bf16_logits():
    s = S.to(torch.bfloat16).requires_grad_()
    loss = reverse_kl(s, Tt.to(torch.bfloat16))
    loss.backward()
    assert loss.dtype == torch.float32 and s.grad is not None and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl"])
def test_the_written_out_kl_gradient_equals_autograds(name):
    """`_DenseKL` (the KD term of every step) against autograd through the plain formula, value and gradient."""
    from mome_ray.losses import DIVERGENCES, _kl

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 50, dtype=torch.float64, requires_grad=True)
    t = torch.log_softmax(torch.randn(3, 5, 50, dtype=torch.float64) * 3, -1)
    s = torch.log_softmax(logits, -1)
    fast = DIVERGENCES[name](s, t)
    slow = _kl(t, s) if name == "forward_kl" else _kl(s, t)
    assert torch.allclose(fast, slow)
    g_fast, = torch.autograd.grad(fast.sum(), logits, retain_graph=True)
    g_slow, = torch.autograd.grad(slow.sum(), logits)
    assert torch.allclose(g_fast, g_slow)
