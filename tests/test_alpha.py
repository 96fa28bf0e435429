"""α strategies: fixed, alternating, and the paper's adaptive rule on hand-made loss histories."""

import pytest

from mome_ray.alpha import AlphaConfig, AlphaSchedule, check_adapts, differential_weight, window
from mome_ray.errors import MomeError


def test_fixed_and_alternating():
    fixed = AlphaSchedule(AlphaConfig("fixed", 0.25), total_steps=100)
    assert fixed.weights(0) == fixed.weights(7) == (0.25, 0.75)
    alt = AlphaSchedule(AlphaConfig("alternating"), total_steps=100)
    assert [alt.weights(s) for s in range(4)] == [(1.0, 0.0), (0.0, 1.0), (1.0, 0.0), (0.0, 1.0)]


def test_window_is_max_of_20_and_one_percent_of_steps():
    assert window(500, 20) == 20 and window(10_000, 20) == 100


def test_differential_weight_keeps_falling_losses_and_damps_rising_ones():
    assert differential_weight([4.0, 3.0, 2.0], 3) == 1.0  # falling: full weight
    # rising from 1 to 2 over a window with mean 1.5: n = 1/1.5, w = 1/3
    assert differential_weight([1.0, 1.5, 2.0], 3) == pytest.approx(1 / 3)
    assert differential_weight([1.0, 5.0, 9.0], 3) == 0.0  # clamped
    assert differential_weight([0.0, 0.0, 0.0], 3) == 1.0  # zero mean: n = 0


def test_adaptive_moves_weight_to_the_falling_loss_after_a_full_window():
    sched = AlphaSchedule(AlphaConfig("adaptive", 0.5, min_window=3), total_steps=10)
    for ce, kd in [(4.0, 1.0), (3.0, 1.5)]:
        sched.update(ce, kd)
        assert sched.weights(0) == (0.5, 0.5)  # fewer than k values: initial α
    sched.update(2.0, 2.0)  # CE falls (w=1), KD rises 1 -> 2 with mean 1.5 (w=1/3)
    alpha, beta = sched.weights(3)
    assert alpha == pytest.approx(1 / (1 + 1 / 3)) and beta == pytest.approx(1 - alpha)


def test_adaptive_keeps_alpha_when_both_losses_blow_up():
    sched = AlphaSchedule(AlphaConfig("adaptive", 0.4, min_window=2), total_steps=10)
    sched.update(1.0, 1.0)
    sched.update(9.0, 9.0)  # both weights 0: the paper's code divides by zero; we keep α
    assert sched.weights(2) == (0.4, pytest.approx(0.6))


def test_state_round_trip_and_bad_alpha():
    a = AlphaSchedule(AlphaConfig("adaptive", 0.5, min_window=2), total_steps=10)
    for v in (3.0, 2.0, 2.5):
        a.update(v, 5 - v)
    b = AlphaSchedule(AlphaConfig("adaptive", 0.5, min_window=2), total_steps=10)
    b.load_state_dict(a.state_dict())
    a.update(1.0, 1.0)
    b.update(1.0, 1.0)
    assert a.weights(9) == b.weights(9)
    with pytest.raises(MomeError, match=r"alpha.alpha must be in \[0, 1\]"):
        AlphaConfig("fixed", 1.5)


def test_an_adaptive_alpha_that_cannot_move_is_refused():
    """A window as long as the run leaves α at its start: the 'adaptive' arm would be the fixed one."""
    from mome_ray.kd_sweep import check_space
    from mome_ray.moe_train import MoEConfig
    from mome_ray.training import TrainConfig

    check_adapts(AlphaConfig("adaptive", min_window=4), 12, "distill.alpha")
    check_adapts(AlphaConfig("fixed"), 3, "distill.alpha")  # only adaptive has a window
    with pytest.raises(MomeError, match=r"distill.alpha: adaptive .* window of 20 .* 20 steps.*min_window below 20"):
        check_adapts(AlphaConfig("adaptive"), 20, "distill.alpha")
    with pytest.raises(MomeError, match="moe.alpha"):  # a KD recipe checks itself when it is built
        MoEConfig(train=TrainConfig(max_steps=10), alpha=AlphaConfig("adaptive"))
    space = {"alpha": {"grid": [{"strategy": "fixed", "alpha": 0.5}, {"strategy": "adaptive", "alpha": 0.5}]}}
    check_space(space, {"min_window": 4}, 12)
    with pytest.raises(MomeError, match="kd search space's alpha"):
        check_space(space, {"min_window": 20}, 12)
