"""The run's report: RUN_DIR/report.md + PNG plots (RUN_DIR/plots/) of every stage that has run.

    mome report runs/small          # also the last step of `mome pipeline`

Sections: corpus, teacher, knowledge distillation (CE/KD curves with α/β), experts vs teacher, router,
MoE evaluation grid, forgetting, and the paper's five claims, each with our numbers and a verdict
(supported / not supported / mixed) computed from them. A stage that has not run is listed as "not run".
Reads only artifacts (`meta.json`, CSV tables, PNGs the stages wrote); trains nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from mome_ray.errors import MomeError
from mome_ray.plots import bars, lines, panels
from mome_ray.sweeps import markdown_table

CLOSE = 0.10  # "about the same": within 10 % (relative) of each other
FORGETS = 0.05  # a language is forgotten when final − best > 5 % of its best perplexity


def _meta(run_dir: Path, stage: str) -> dict | None:
    path = run_dir / stage / "meta.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _csv(path: Path):
    import pandas as pd

    return pd.read_csv(path) if path.is_file() else None


def _img(run_dir: Path, path: Path, alt: str) -> str:
    return f"![{alt}]({Path(path).relative_to(run_dir).as_posix()})\n"


# --- sections: each returns markdown, or None when its stage has not run


def corpus_section(run_dir: Path, plots: Path) -> str | None:
    path = run_dir / "corpus" / "manifest.json"
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
    rows = [f"| {split} | " + " | ".join(f"{s[l]['docs']:,} docs, {s[l]['tokens']:,}" for l in m["langs"])
            + f" | {s['max_over_min']:.3f} |" for split, s in m["splits"].items()]
    table = "\n".join(["| split | " + " | ".join(m["langs"]) + " | max/min |", "|---" * (len(m["langs"]) + 2) + "|"]
                      + rows)
    sources = ", ".join(f"{s['name']} ({s['lang']}, {s['docs_kept']} docs)" for s in m["sources"])
    return (f"Tokens are {m['token_unit']}; languages balanced within ±{100 * m['tolerance']:.0f} %.\n\n{table}\n\n"
            f"Sources: {sources}.\n")


def _history_series(history: list[dict], langs: list[str]) -> dict:
    return {l: ([h["step"] for h in history], [h[f"val_ppl/{l}"] for h in history]) for l in langs
            if f"val_ppl/{l}" in history[0]}


def teacher_section(run_dir: Path, plots: Path) -> str | None:
    meta = _meta(run_dir, "teacher")
    if meta is None:
        return None
    langs, m = meta["config"]["langs"], meta["metrics"]
    png = lines(_history_series(m["history"], langs), plots / "teacher.png", "teacher", "step",
                "validation perplexity", logy=True)
    rows = " | ".join(f"{l} {m['untrained'][f'val_ppl/{l}']:,.0f} → {m['final'][f'val_ppl/{l}']:,.2f}" for l in langs)
    model = meta["config"]["teacher"]["model"]
    return (f"GPT-2 {model['n_layer']} layers × {model['n_embd']}, {m['final']['step']} steps. Validation "
            f"perplexity untrained → trained: {rows}.\n\n" + _img(run_dir, png, "teacher curves"))


def kd_section(run_dir: Path, plots: Path) -> str | None:
    meta = _meta(run_dir, "experts")
    if meta is None:
        return None
    langs = [l for l in meta["config"]["langs"] if _meta(run_dir / "experts", l)]
    traces = {l: _meta(run_dir / "experts", l)["metrics"]["trace"] for l in langs}
    loss_png = panels([(l, {"CE": (t["step"], t["ce"]), "KD": (t["step"], t["kd"])}) for l, t in traces.items()],
                      plots / "kd_losses.png", "step", "loss")
    weight_png = panels([(l, {"α": (t["step"], t["alpha"]), "β": (t["step"], t["beta"])}) for l, t in traces.items()],
                        plots / "kd_weights.png", "step", "weight")
    d = meta["config"]["distill"]
    return (f"Loss α·CE + β·KD ({d['kd_loss']}, {d['alpha']['strategy']} α), per expert:\n\n"
            + _img(run_dir, loss_png, "CE and KD per step") + "\n" + _img(run_dir, weight_png, "alpha and beta"))


def experts_section(run_dir: Path, plots: Path) -> str | None:
    table = _csv(run_dir / "experts" / "eval.csv")
    if table is None:
        return None
    langs = [c for c in table.columns if c not in ("model", "params_M", "mean")]
    png = bars({r["model"]: {l: r[l] for l in langs} for r in table.to_dict(orient="records")},
               plots / "experts_vs_teacher.png", "validation perplexity, same blocks", "perplexity", logy=True)
    return markdown_table(table) + "\n" + _img(run_dir, png, "experts vs teacher")


def router_section(run_dir: Path, plots: Path) -> str | None:
    meta = _meta(run_dir, "router")
    if meta is None:
        return None
    m = meta["metrics"]
    shown = {k: v for k, v in m.items() if isinstance(v, (int, float))}
    text = "\n".join(f"- {k}: {v:.4g}" for k, v in shown.items())
    for key in ("accuracy_by_length", "heldout_accuracy", "mixed_accuracy"):
        if isinstance(m.get(key), dict) and m[key]:
            text += f"\n- {key}: " + ", ".join(f"{k} {v:.4f}" for k, v in m[key].items())
    confusion = run_dir / "router" / "confusion.png"
    return text + "\n\n" + (_img(run_dir, confusion, "router confusion matrix") if confusion.is_file() else "")


def grid_section(run_dir: Path, plots: Path) -> str | None:
    meta, md = _meta(run_dir, "moe"), run_dir / "moe" / "grid.md"
    if meta is None or not md.is_file():
        return None
    grid = _csv(run_dir / "moe" / "grid.csv")
    routing = meta["metrics"]["routing"]
    langs = [c.removeprefix("ppl/") for c in grid.columns if c.startswith("ppl/")]
    main = grid[grid.row.isin(["-", f"{routing} top-1", f"{routing} top-1 + common"])]
    png = bars({f"{r['model']} {'' if r['row'] == '-' else r['row']}".strip(): {l: r[f"ppl/{l}"] for l in langs}
                for r in main.to_dict(orient="records")}, plots / "moe_grid.png",
               f"validation perplexity ({routing} routing)", "perplexity", logy=True)
    how = ("the router artifact (RUN_DIR/router)" if routing == "router"
           else "an oracle router (each block to its true language; no router artifact)")
    return (f"Routing by {how}. Perplexity per language on the same validation blocks for every row; eval_s is "
            f"the evaluation time; active_M = parameters one sequence runs through, total_M = the whole model.\n\n"
            + md.read_text() + "\n" + _img(run_dir, png, "MoE grid"))


def forgetting_section(run_dir: Path, plots: Path) -> str | None:
    md = run_dir / "forgetting" / "forgetting.md"
    if _meta(run_dir, "forgetting") is None or not md.is_file():
        return None
    return (md.read_text() + "\n" + _img(run_dir, run_dir / "forgetting" / "heatmap.png", "forgetting heatmap")
            + "\n" + _img(run_dir, run_dir / "forgetting" / "lines.png", "perplexity per stage"))


# --- the paper's claims: (claim, our numbers, verdict)


def _verdict(checks: list[bool]) -> str:
    return "supported" if all(checks) else "not supported" if not any(checks) else "mixed"


def claim_alpha(run_dir: Path) -> tuple[str, str]:
    df = _csv(run_dir / "sweep_kd" / "results.csv")
    if df is None or not {"fixed", "adaptive"} <= set(df.strategy):
        return "not measured: run `mome sweep kd` (fixed and adaptive α in the space)", "not measured"
    best = df.groupby("strategy")["val_ppl"].min()
    fixed, adaptive = best["fixed"], best["adaptive"]
    close = abs(adaptive - fixed) / fixed <= CLOSE
    return (f"best val ppl fixed {fixed:.2f}, adaptive {adaptive:.2f}",
            _verdict([close, adaptive <= fixed]))


def claim_combined(run_dir: Path) -> tuple[str, str]:
    df = _csv(run_dir / "sweep_kd" / "results.csv")
    if df is None or "alternating" not in set(df.strategy) or df.strategy.eq("alternating").all():
        return "not measured: run `mome sweep kd` with alternating and combined α", "not measured"
    df = df.assign(combined=df.strategy != "alternating", drift=(df.val_ppl - df.best_val_ppl) / df.best_val_ppl)
    g = df.groupby("combined")[["val_ppl", "drift"]].min()
    return (f"final val ppl combined {g.val_ppl[True]:.2f} vs alternating {g.val_ppl[False]:.2f}; final − best "
            f"combined {100 * g.drift[True]:.1f} % vs alternating {100 * g.drift[False]:.1f} %",
            _verdict([g.val_ppl[True] <= g.val_ppl[False], g.drift[True] <= g.drift[False]]))


def claim_router(run_dir: Path) -> tuple[str, str]:
    meta = _meta(run_dir, "router")
    f1 = (meta or {}).get("metrics", {}).get("test_f1_weighted")
    if f1 is None:
        return "not measured: run `mome router`", "not measured"
    return f"weighted F1 {100 * f1:.2f} % (paper 99.95 %)", _verdict([f1 >= 0.9995, f1 >= 0.99])


def claim_moe(run_dir: Path) -> tuple[str, str]:
    meta, grid = _meta(run_dir, "moe"), _csv(run_dir / "moe" / "grid.csv")
    if meta is None or grid is None:
        return "not measured: run `mome moe`", "not measured"
    top1 = f"{meta['metrics']['routing']} top-1"
    ppl = {(r["model"], r["row"]): r["mean_ppl"] for r in grid.to_dict(orient="records")}
    ple, jeet, ce, ce_common = (ppl[("PLE", top1)], ppl[("JEET", top1)], ppl[("MoE-CE", top1)],
                                ppl[("MoE-CE", f"{top1} + common")])
    best = min(ple, jeet)
    return (f"mean ppl ({top1}): PLE {ple:.2f}, JEET {jeet:.2f}, MoE-CE stacks alone {ce:.2f}, MoE-CE with the "
            f"common expert {ce_common:.2f}",
            _verdict([abs(jeet - ple) / ple <= CLOSE, ce > best, abs(ce_common - best) / best <= CLOSE]))


def claim_forgetting(run_dir: Path) -> tuple[str, str]:
    df = _csv(run_dir / "forgetting" / "forgetting.csv")
    if df is None:
        return "not measured: run `mome forgetting`", "not measured"
    langs = list(dict.fromkeys(df.lang))
    pct = {r: df[df.regime == r].set_index("lang").forgetting_pct for r in ("sequential", "balanced", "moe")}
    early = pct["sequential"][langs[:-1]]
    return (f"forgetting (final − best, % of best): sequential on {', '.join(langs[:-1])} "
            + ", ".join(f"{v:.1f}" for v in early) + f"; balanced max {pct['balanced'].max():.1f}; "
            f"MoE max {pct['moe'].max():.1f}",
            _verdict([early.min() > 100 * FORGETS, pct["balanced"].max() <= 100 * FORGETS,
                      pct["moe"].max() <= 100 * FORGETS]))


CLAIMS = [
    ("Fixed and adaptive α perform about the same; adaptive marginally better", claim_alpha),
    ("Combined α·CE + β·KD is more stable than alternating the losses", claim_combined),
    ("The router reaches 99.95 % precision/recall/F1", claim_router),
    ("PLE ≈ JEET; MoE-CE slightly lower; the common expert brings MoE-CE close", claim_moe),
    ("Sequential training forgets; balanced batches and the MoE do not", claim_forgetting),
]

SECTIONS: list[tuple[str, str, Callable]] = [
    ("Corpus", "corpus", corpus_section),
    ("Teacher", "teacher", teacher_section),
    ("Knowledge distillation", "experts", kd_section),
    ("Experts vs teacher", "experts", experts_section),
    ("Router", "router", router_section),
    ("MoE evaluation grid", "moe", grid_section),
    ("Forgetting", "forgetting", forgetting_section),
]


# What the report reads: every stage's artifact, and the nested ones (experts, MoE variants).
REPORT_STAGES = ["corpus", "tokenizer", "teacher", "experts", "experts/*", "sweep_kd", "router", "moe", "moe/*",
                 "forgetting"]


def write_report(run) -> str:
    """Write RUN_DIR/report.md and its plots (RUN_DIR/plots/) into the run's storage; returns its location."""
    from mome_ray.artifacts import as_store

    store = as_store(run)
    if not store.remote and not Path(store.location).is_dir():
        raise MomeError(f"no run directory '{store.location}'; run 'mome pipeline --config CONFIG' first")
    if store.meta("corpus") is None and store.remote:
        raise MomeError(f"no run at '{store.location}' (no corpus artifact); run 'mome pipeline --config CONFIG' "
                        f"with run_dir={store.location} first")
    with store.view(REPORT_STAGES) as run_dir:
        path = _write_report(run_dir, store.name)
        if store.remote:
            for png in sorted((run_dir / "plots").glob("*.png")):
                store.upload(png, f"plots/{png.name}")
            store.upload(path, "report.md")
    return store.uri("report.md")


def _write_report(run_dir: Path, name: str) -> Path:
    from mome_ray.artifacts import MAKES

    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    parts = [f"# mome-ray report: {name}\n",
             "After arXiv 2407.19610 (Mixture of Modular Experts). Every number below is read from this run's "
             "artifacts.\n"]
    for title, stage, section in SECTIONS:
        body = section(run_dir, plots)
        parts.append(f"## {title}\n\n" + (body if body is not None else
                                           f"not run (`{MAKES.get(stage, 'mome ' + stage)} --config CONFIG`)\n"))
    rows = ["| # | claim (paper) | our numbers | verdict |", "|---|---|---|---|"]
    for i, (claim, measure) in enumerate(CLAIMS, 1):
        numbers, verdict = measure(run_dir)
        rows.append(f"| {i} | {claim} | {numbers} | **{verdict}** |")
    parts.append("## The paper's claims\n\n" + "\n".join(rows) + "\n\n"
                 f"Thresholds: \"about the same\" / \"close\" = within {100 * CLOSE:.0f} %; a language is forgotten "
                 f"when final − best > {100 * FORGETS:.0f} % of its best perplexity. A claim is *mixed* when some of "
                 f"its parts hold and others do not.\n")
    path = run_dir / "report.md"
    path.write_text("\n".join(parts))
    return path
