"""The paper's five claims judged from our numbers: pure functions of tables (unit-tested on synthetic ones).

Each `judge_*` returns a `Claim`: what we measured, each part of the claim with its outcome, and a verdict —
*supported* (every part holds), *not supported* (none does), *mixed* — or *not measured* when the data to
judge it is missing or too thin (fewer than `MIN_SEEDS` paired seeds).

A difference counts only when it exceeds the noise:
- sweep arms (claims 1, 2) run with the same seeds: per seed, the relative difference d_s = a_s / b_s − 1.
  "a lower than b" needs every d_s < 0 and |mean d| greater than the standard deviation of the d_s (the
  seed spread); likewise "higher"; anything else is "no difference".
- test-split tables (claim 4): the paired bootstrap by document (`evaluation.compare`): a differs from b when
  the 95 % interval of the perplexity ratio excludes 1.
"About the same" / "close" means within `CLOSE`: for seeds |mean d| ≤ CLOSE, for the bootstrap the whole 95 %
interval of the ratio inside [1 − CLOSE, 1 + CLOSE]. A language is forgotten when its final perplexity is more
than `FORGETS` above its best over the stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CLOSE = 0.10
FORGETS = 0.05
MIN_SEEDS = 3


@dataclass
class Claim:
    numbers: str
    parts: list[tuple[str, bool]] = field(default_factory=list)
    measured: bool = True

    @property
    def verdict(self) -> str:
        if not self.measured:
            return "not measured"
        held = [ok for _, ok in self.parts]
        return "supported" if all(held) else "not supported" if not any(held) else "mixed"

    def text(self) -> str:
        parts = "; ".join(f"{name}: {'yes' if ok else 'no'}" for name, ok in self.parts)
        return self.numbers + (f" — {parts}" if parts else "")


def not_measured(why: str) -> Claim:
    return Claim(f"not measured: {why}", measured=False)


@dataclass
class Paired:
    """a vs b over paired seeds: relative differences a/b − 1, their mean and spread, and the outcome."""

    diffs: np.ndarray

    @property
    def mean(self) -> float:
        return float(self.diffs.mean())

    @property
    def sd(self) -> float:
        return float(self.diffs.std(ddof=1)) if len(self.diffs) > 1 else float("inf")

    @property
    def verdict(self) -> str:
        if (self.diffs < 0).all() and -self.mean > self.sd:
            return "lower"
        if (self.diffs > 0).all() and self.mean > self.sd:
            return "higher"
        return "no difference"

    def __str__(self) -> str:
        return f"{100 * self.mean:+.1f} % ± {100 * self.sd:.1f} % over {len(self.diffs)} seeds ({self.verdict})"


def paired(a, b, relative: bool = True) -> Paired | None:
    """Seed-indexed Series a, b -> Paired on their common seeds (None below MIN_SEEDS)."""
    seeds = sorted(set(a.index) & set(b.index))
    if len(seeds) < MIN_SEEDS:
        return None
    x, y = a.loc[seeds].to_numpy(float), b.loc[seeds].to_numpy(float)
    return Paired(x / y - 1 if relative else x - y)


def _arm(df, setting: str, col: str):
    return df[df.setting == setting].set_index("seed")[col]


def _best_arm(arms, strategies: set[str]):
    """The arm with the best mean validation perplexity among `strategies` (selection on validation)."""
    rows = arms[arms.strategy.isin(strategies)]
    return None if rows.empty else rows.iloc[0]


def _label(arm) -> str:
    return f"fixed α={arm.alpha}" if arm.strategy == "fixed" else str(arm.strategy)


def judge_alpha(results) -> Claim:
    """Claim 1 on the KD sweep's trials (kd_sweep.results_frame): best fixed vs best adaptive arm, test ppl."""
    from mome_ray.kd_sweep import arms_frame

    if results is None:
        return not_measured("no KD sweep (the `sweep_kd` stage)")
    arms = arms_frame(results)
    fixed, adaptive = _best_arm(arms, {"fixed"}), _best_arm(arms, {"adaptive"})
    if fixed is None or adaptive is None:
        return not_measured("the KD sweep's space has no fixed and adaptive α arms")
    p = paired(_arm(results, adaptive.setting, "test_ppl"), _arm(results, fixed.setting, "test_ppl"))
    if p is None:
        return not_measured(f"fewer than {MIN_SEEDS} paired seeds per arm (distill.sweep.seeds)")
    if (abs(p.diffs) < 1e-9).all():  # the same test perplexity on every seed: the runs were the same run
        return not_measured(f"adaptive α ran as fixed α = {fixed.alpha} on every seed (test ppl "
                            f"{adaptive.test_ppl_mean:.2f} both): α only moves when a loss rises over its window, "
                            f"and both kept falling; compare on longer trials (distill.sweep.max_steps)")
    numbers = (f"test ppl adaptive {adaptive.test_ppl_mean:.2f} ± {adaptive.test_ppl_sd:.2f}, "
               f"{_label(fixed)} {fixed.test_ppl_mean:.2f} ± {fixed.test_ppl_sd:.2f}; adaptive vs fixed {p}")
    return Claim(numbers, [("about the same (within 10 %)", abs(p.mean) <= CLOSE),
                           ("adaptive better beyond the seed spread", p.verdict == "lower")])


def judge_combined(results) -> Claim:
    """Claim 2: the best combined arm (fixed or adaptive α, chosen on validation) vs alternating, paired:
    final test perplexity, and drift (final − best validation perplexity during the run, relative)."""
    from mome_ray.kd_sweep import arms_frame

    if results is None:
        return not_measured("no KD sweep (the `sweep_kd` stage)")
    arms = arms_frame(results)
    combined, alternating = _best_arm(arms, {"fixed", "adaptive"}), _best_arm(arms, {"alternating"})
    if combined is None or alternating is None:
        return not_measured("the KD sweep's space has no alternating arm beside a combined one")
    drift = results.assign(drift=(results.val_ppl - results.best_val_ppl) / results.best_val_ppl)
    final = paired(_arm(results, combined.setting, "test_ppl"), _arm(results, alternating.setting, "test_ppl"))
    stable = paired(_arm(drift, combined.setting, "drift"), _arm(drift, alternating.setting, "drift"), relative=False)
    if final is None or stable is None:
        return not_measured(f"fewer than {MIN_SEEDS} paired seeds per arm (distill.sweep.seeds)")
    d = drift.groupby("setting").drift.mean()
    numbers = (f"test ppl combined ({_label(combined)}) {combined.test_ppl_mean:.2f} ± {combined.test_ppl_sd:.2f}, "
               f"alternating {alternating.test_ppl_mean:.2f} ± {alternating.test_ppl_sd:.2f}: {final}; final − best "
               f"val ppl {100 * d[combined.setting]:.1f} % vs {100 * d[alternating.setting]:.1f} %")
    return Claim(numbers, [("combined lower test ppl beyond the seed spread", final.verdict == "lower"),
                           ("combined drifts less from its best", stable.verdict == "lower")])


def judge_router(metrics: dict | None) -> Claim:
    """Claim 3: weighted F1 on the test split's sequences, with its bootstrap interval when the router stage
    gave one: "reaches 99.95 %" holds when the interval reaches it (no difference from the paper's number)."""
    f1 = (metrics or {}).get("test_f1_weighted")
    if f1 is None:
        return not_measured("no router (`mome router`)")
    lo, hi = (metrics or {}).get("test_f1_interval") or (f1, f1)
    return Claim(f"weighted F1 {100 * f1:.2f} % [{100 * lo:.2f}, {100 * hi:.2f}] on test sequences (paper 99.95 %)",
                 [("reaches 99.95 % (within the 95 % interval)", hi >= 0.9995),
                  ("above 99 % (the whole interval)", lo >= 0.99)])


def _within(c, close: float = CLOSE) -> bool:
    return c.lo >= 1 - close and c.hi <= 1 + close


def judge_moe(docs: dict | None, routing: str, eval_cfg) -> Claim:
    """Claim 4 on the grid's per-document losses (`moe/grid_docs.npz`): PLE and JEET through the router, and
    MoE-CE as trained (router top-1 + its common expert)."""
    from mome_ray.evaluation import compare

    top1 = f"{routing} top-1"
    keys = {"PLE": f"PLE | {top1}", "JEET": f"JEET | {top1}", "MoE-CE": f"MoE-CE | {top1} + common"}
    if docs is None or any(k not in docs for k in keys.values()):
        return not_measured("no evaluation grid (`mome moe`)")
    ple, jeet, ce = (docs[k] for k in keys.values())
    jp = compare(jeet, ple, eval_cfg)
    best_name, best = min((("PLE", ple), ("JEET", jeet)), key=lambda kv: np.mean([d.mean for d in kv[1].values()]))
    cb = compare(ce, best, eval_cfg)
    numbers = (f"test ppl ratios [95 % CI]: JEET / PLE {jp} ({jp.verdict}); MoE-CE as trained (with its common "
               f"expert) / {best_name} {cb} ({cb.verdict})")
    return Claim(numbers, [("PLE ≈ JEET (CI within ±10 %)", _within(jp)),
                           ("MoE-CE slightly lower (worse, by at most 10 %)", cb.verdict == "higher" and cb.ratio <= 1 + CLOSE),
                           ("MoE-CE close to them (CI within ±10 %)", _within(cb))])


def judge_forgetting(table, docs: dict | None = None, eval_cfg=None) -> Claim:
    """Claim 5 on forgetting.csv (regime, lang, forgetting_pct, by_construction, params_total): sequential
    forgets every language before the last; balanced and the shared-parts MoE (`jeet`) forget none; and, with
    the regimes' per-document test losses (`docs`: {regime: {lang: DocLosses}}), the MoE's final model is
    better than sequential's on the earlier languages (paired bootstrap). The separate-experts regime cannot
    forget by construction: shown, never counted as evidence."""
    if table is None:
        return not_measured("no forgetting study (`mome forgetting`)")
    regimes = set(table.regime)
    if not {"sequential", "balanced", "jeet"} <= regimes:
        return not_measured("the forgetting study lacks the sequential, balanced or jeet regime")
    langs = list(dict.fromkeys(table.lang))
    pct = {r: table[table.regime == r].set_index("lang").forgetting_pct for r in regimes}
    params = table.groupby("regime").params_total.first() if "params_total" in table else {}
    size = lambda r: f" ({params[r] / 1e6:.2f}M params)" if r in params else ""  # noqa: E731
    early = pct["sequential"][langs[:-1]]
    numbers = (f"forgetting (final − best val ppl, % of best): sequential{size('sequential')} on "
               + ", ".join(f"{l} {v:.1f}" for l, v in early.items())
               + f"; balanced{size('balanced')} max {pct['balanced'].max():.1f}; MoE with shared parts (JEET)"
               f"{size('jeet')} max {pct['jeet'].max():.1f}")
    if "separate" in pct:
        numbers += f"; separate experts{size('separate')} max {pct['separate'].max():.1f} (impossible by construction)"
    parts = [("sequential forgets every earlier language (> 5 %)", bool((early > 100 * FORGETS).all())),
             ("balanced forgets none", bool(pct["balanced"].max() <= 100 * FORGETS)),
             ("the shared-parts MoE forgets none", bool(pct["jeet"].max() <= 100 * FORGETS))]
    if docs and {"jeet", "sequential"} <= set(docs):
        from mome_ray.evaluation import compare

        c = compare(*({l: docs[r][l] for l in langs[:-1]} for r in ("jeet", "sequential")), eval_cfg)
        numbers += f"; test ppl on {', '.join(langs[:-1])}, JEET / sequential {c}"
        parts.append(("the shared-parts MoE ends better than sequential on the earlier languages (test, 95 %)",
                      c.verdict == "lower"))
    return Claim(numbers, parts)


RULES = (f"A difference counts only beyond the noise: across seeds, every paired seed must agree in sign and the "
         f"mean difference exceed the seeds' standard deviation (≥ {MIN_SEEDS} seeds); on test-split tables, the 95 % "
         f"paired bootstrap interval (by document) of the ratio must exclude 1. \"About the same\" / \"close\" = "
         f"within {100 * CLOSE:.0f} % (for intervals: the whole interval). A language is forgotten when its final "
         f"perplexity is more than {100 * FORGETS:.0f} % above its best. A claim is *mixed* when some of its parts "
         f"hold and others do not.")
