"""Every claim's verdict logic on synthetic tables: each can come out supported, not supported or mixed."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mome_ray import claims
from mome_ray.evaluation import DocLosses, EvalConfig

SEEDS = [0, 1, 2]


def _sweep(test: dict[str, list[float]], drift: dict[str, list[float]] | None = None, seeds=SEEDS) -> pd.DataFrame:
    """Trials of arms {"fixed" | "adaptive" | "alternating": test ppl per seed}; val = test (+ drift)."""
    rows = []
    for arm, values in test.items():
        params = {"alpha": {"strategy": arm, "alpha": 0.5}}
        for seed, v, d in zip(seeds, values, (drift or {}).get(arm, [0.0] * len(values))):
            rows.append({"seed": seed, "strategy": arm, "alpha": 0.5 if arm == "fixed" else "", "kd_loss": "reverse_kl",
                         "temperature": 1.0, "val_ppl": v * (1 + d), "best_val_ppl": v, "test_ppl": v, "steps": 10,
                         "error": "", "setting": json.dumps(params, sort_keys=True)})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("adaptive, verdict", [
    ([98.0, 99.0, 97.9], "supported"),        # 1-2 % better on every seed, little spread: same and better
    ([101.0, 99.0, 100.5], "mixed"),          # within the seed spread: about the same, not better
    ([130.0, 131.0, 129.0], "not supported"),  # 30 % worse on every seed
])
def test_alpha_claim(adaptive, verdict):
    claim = claims.judge_alpha(_sweep({"fixed": [100.0, 101.0, 99.8], "adaptive": adaptive}))
    assert claim.verdict == verdict, claim.text()
    assert "seeds" in claim.numbers


def test_alpha_claim_is_not_judged_on_two_identical_runs():
    """Adaptive α that never moved (both losses kept falling) ran as fixed α: no evidence, not "about the same"."""
    claim = claims.judge_alpha(_sweep({"fixed": [100.0, 101.0, 99.8], "adaptive": [100.0, 101.0, 99.8]}))
    assert claim.verdict == "not measured" and "ran as fixed α = 0.5 on every seed" in claim.text()


def test_claims_read_the_sweep_back_from_its_csv(tmp_path):
    _sweep({"fixed": [100.0, 101.0, 99.8], "adaptive": [98.0, 99.0, 97.9]}).to_csv(tmp_path / "r.csv", index=False)
    assert claims.judge_alpha(pd.read_csv(tmp_path / "r.csv")).verdict == "supported"  # empty errors come back NaN


def test_alpha_claim_needs_three_paired_seeds_and_both_arms():
    two = _sweep({"fixed": [100.0, 101.0], "adaptive": [98.0, 99.0]}, seeds=[0, 1])
    assert claims.judge_alpha(two).verdict == "not measured"
    assert claims.judge_alpha(_sweep({"fixed": [1.0, 2.0, 3.0]})).verdict == "not measured"
    assert claims.judge_alpha(None).verdict == "not measured"


@pytest.mark.parametrize("alternating, drift, verdict", [
    ([110.0, 112.0, 111.0], {"fixed": [0.0, 0.0, 0.01], "alternating": [0.05, 0.06, 0.07]}, "supported"),
    ([110.0, 112.0, 111.0], {"fixed": [0.05, 0.06, 0.07], "alternating": [0.0, 0.0, 0.01]}, "mixed"),
    ([90.0, 91.0, 90.5], {"fixed": [0.05, 0.06, 0.07], "alternating": [0.0, 0.0, 0.01]}, "not supported"),
])
def test_combined_claim(alternating, drift, verdict):
    claim = claims.judge_combined(_sweep({"fixed": [100.0, 101.0, 99.8], "alternating": alternating}, drift))
    assert claim.verdict == verdict, claim.text()


def test_paired_seeds_need_agreement_and_to_beat_the_spread():
    idx = pd.Index(SEEDS)
    a = pd.Series([90.0, 95.0, 99.0], idx)
    assert claims.paired(a, pd.Series([100.0, 100.0, 100.0], idx)).verdict == "lower"
    assert claims.paired(pd.Series([90.0, 110.0, 99.0], idx), pd.Series([100.0] * 3, idx)).verdict == "no difference"
    # all lower, but one seed by far: the mean does not beat the spread
    assert claims.paired(pd.Series([99.9, 99.9, 60.0], idx), pd.Series([100.0] * 3, idx)).verdict == "no difference"


@pytest.mark.parametrize("f1, interval, verdict", [
    (0.9996, None, "supported"), (0.995, None, "mixed"), (0.9, None, "not supported"),
    (0.9990, [0.9975, 0.9998], "supported"),   # below 99.95 %, but not by more than the noise
    (0.9950, [0.9920, 0.9980], "mixed"),
    (0.9950, [0.9850, 0.9990], "not supported"),  # the interval reaches below 99 %
])
def test_router_claim(f1, interval, verdict):
    claim = claims.judge_router({"test_f1_weighted": f1, "test_f1_interval": interval})
    assert claim.verdict == verdict, claim.text()
    assert claims.judge_router(None).verdict == "not measured"


def test_the_router_f1_interval_covers_the_point_and_widens_with_errors():
    from mome_ray.router.evaluate import f1_interval

    y = ["en"] * 100 + ["fr"] * 100
    perfect = f1_interval(y, y, ["en", "fr"], n=200)
    assert perfect == [1.0, 1.0]
    noisy = f1_interval(y, y[:95] + ["fr"] * 5 + y[100:], ["en", "fr"], n=200)
    assert noisy[0] < 0.975 < noisy[1] <= 1.0


def _docs(rng, shift=0.0, noise=0.0, n=60):
    out = {}
    for lang in ("en", "fr"):
        base = np.random.default_rng(7).normal(4.0, 0.6, n)  # the same documents for every model
        tokens = np.full(n, 100)
        out[lang] = DocLosses((base + shift + rng.normal(0, noise, n)) * tokens, tokens.astype(np.int64))
    return out


@pytest.mark.parametrize("jeet_shift, ce_shift, verdict", [
    (0.0, 0.05, "supported"),    # JEET = PLE, MoE-CE 5 % worse: slightly lower and close
    (0.0, 0.4, "mixed"),         # MoE-CE 49 % worse: not slightly, not close
    (0.5, -0.3, "not supported"),  # JEET 65 % worse than PLE; MoE-CE better than both
])
def test_moe_claim(jeet_shift, ce_shift, verdict):
    rng = np.random.default_rng(0)
    docs = {"PLE | router top-1": _docs(rng), "JEET | router top-1": _docs(rng, jeet_shift, 0.01),
            "MoE-CE | router top-1 + common": _docs(rng, ce_shift, 0.01)}
    claim = claims.judge_moe(docs, "router", EvalConfig(bootstrap=300))
    assert claim.verdict == verdict, claim.text()
    assert claims.judge_moe({}, "router", EvalConfig()).verdict == "not measured"


def _forgetting(seq, bal, jeet, sep=(0.0, 0.0, 0.0, 0.0)):
    rows = []
    for regime, pcts in (("sequential", seq), ("balanced", bal), ("jeet", jeet), ("separate", sep)):
        rows += [{"regime": regime, "lang": l, "forgetting_pct": p, "params_total": 1e6 * (4 if regime == "separate"
                                                                                          else 1),
                  "by_construction": regime == "separate"} for l, p in zip(["en", "fr", "de", "py"], pcts)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("table, verdict", [
    (_forgetting([40, 30, 20, 0], [1, 2, 0, 0], [2, 3, 1, 0]), "supported"),
    (_forgetting([40, 30, 20, 0], [1, 2, 0, 0], [30, 20, 10, 0]), "mixed"),      # the shared parts forget
    (_forgetting([1, 2, 0, 0], [9, 8, 7, 0], [30, 20, 10, 0]), "not supported"),
])
def test_forgetting_claim(table, verdict):
    claim = claims.judge_forgetting(table)
    assert claim.verdict == verdict, claim.text()
    assert "impossible by construction" in claim.numbers and "4.00M params" in claim.numbers


def _regime_docs(jeet_loss: float, seq_loss: float, n: int = 40) -> dict:
    """Per-document test losses of jeet and sequential (en, fr, de, py), noisy around the given mean losses."""
    rng = np.random.default_rng(0)
    make = lambda m: {l: DocLosses(rng.normal(m, 0.3, n) * 50, np.full(n, 50)) for l in ["en", "fr", "de", "py"]}  # noqa: E731
    return {"jeet": make(jeet_loss), "sequential": make(seq_loss)}


@pytest.mark.parametrize("jeet, seq, verdict", [(5.0, 6.0, "supported"), (6.0, 6.0, "mixed"), (6.5, 6.0, "mixed")])
def test_forgetting_claim_compares_final_test_perplexity_with_intervals(jeet, seq, verdict):
    table = _forgetting([40, 30, 20, 0], [1, 2, 0, 0], [2, 3, 1, 0])
    claim = claims.judge_forgetting(table, _regime_docs(jeet, seq), EvalConfig(bootstrap=300))
    assert claim.verdict == verdict, claim.text()
    assert "JEET / sequential" in claim.numbers and len(claim.parts) == 4


def test_forgetting_claim_without_the_shared_moe_regime_is_not_judged():
    table = _forgetting([40, 30, 20, 0], [1, 2, 0, 0], [0, 0, 0, 0])
    assert claims.judge_forgetting(table[table.regime != "jeet"]).verdict == "not measured"
