"""The run's report: RUN_DIR/report.md + PNG plots (RUN_DIR/plots/) of every stage that has run.

    mome report runs/small          # also the last step of `mome pipeline`

Sections: corpus, teacher, knowledge distillation (CE/KD curves with α/β), experts vs teacher, router,
MoE evaluation grid, forgetting, the paper's five claims, each with our numbers and a verdict
(supported / not supported / mixed) computed from them, and the deviations from the paper under this run's
config (`deviations.py`). A stage that has not run is listed as "not run".
Reads only artifacts (`meta.json`, CSV tables, PNGs the stages wrote); trains nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from mome_ray import claims
from mome_ray.errors import MomeError
from mome_ray.plots import bars, lines, panels
from mome_ray.sweeps import markdown_table


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
            f"perplexity untrained → trained: {rows}. {flattening(m['history'])}\n\n"
            + _img(run_dir, png, "teacher curves"))


def flattening(history: list[dict], tail: float = 0.2) -> str:
    """How much the validation loss still fell over the last `tail` of training: is the teacher done?"""
    last = history[-1]
    start = next((h for h in history if h["step"] >= (1 - tail) * last["step"]), last)
    if start is last:
        return ""
    change = last["val_loss"] / start["val_loss"] - 1
    state = "flattened" if abs(change) < 0.01 else "still falling" if change < 0 else "rising"
    return (f"Validation loss over the last {100 * tail:.0f} % of steps ({start['step']} → {last['step']}): "
            f"{100 * change:+.2f} % ({state}).")


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
    from mome_ray.evaluation import shown

    table, meta = _csv(run_dir / "experts" / "eval.csv"), _meta(run_dir, "experts")
    if table is None or meta is None or "ppl/" + meta["config"]["langs"][0] not in table:
        return None
    langs, cfg = meta["config"]["langs"], _eval_cfg(run_dir, "experts")
    png = bars({r["model"]: {l: r[f"ppl/{l}"] for l in langs} for r in table.to_dict(orient="records")},
               plots / "experts_vs_teacher.png", f"{cfg.split} perplexity, same blocks", "perplexity", logy=True)
    return (f"Perplexity on the {cfg.split} split [95 % bootstrap interval by document], every model on the same "
            f"blocks (the whole split per language).\n\n" + markdown_table(shown(table, langs)) + "\n"
            + expert_comparisons(run_dir, langs, cfg) + _img(run_dir, png, "experts vs teacher"))


def expert_comparisons(run_dir: Path, langs: list[str], cfg) -> str:
    """Paired comparisons of the expert table's rows: KD vs CE-only per language; experts vs the multilingual
    student at equal compute and at equal tokens per language."""
    from mome_ray.evaluation import compare, load_doc_losses

    path = run_dir / "experts" / "eval_docs.npz"
    if not path.is_file():
        return ""
    docs = load_doc_losses(path)
    row = lambda prefix: next((d for k, d in docs.items() if k.startswith(prefix)), None)  # noqa: E731
    experts, nokd = row("experts"), row("no-KD")
    lines = []
    if experts and nokd:
        for l in [l for l in langs if l in experts and l in nokd]:
            c = compare({l: experts[l]}, {l: nokd[l]}, cfg)
            lines.append(f"| KD expert / CE-only student | {l} | {c} | {c.verdict} |")
    for label, prefix in (("equal compute", "multilingual student (KD, equal compute)"),
                          ("equal tokens per language", "multilingual student (KD, equal tokens)")):
        multi = row(prefix)
        if experts and multi and set(experts) == set(langs):
            c = compare(experts, {l: multi[l] for l in experts}, cfg)
            lines.append(f"| experts / multilingual student, {label} | all | {c} | {c.verdict} |")
        elif experts:
            lines.append(f"| experts / multilingual student, {label} | all | not run | - |")
    if not lines:
        return ""
    return ("Paired comparisons (perplexity ratio [95 % interval]; *lower* = the first is better):\n\n"
            "| comparison | lang | ratio | outcome |\n|---|---|---|---|\n" + "\n".join(lines) + "\n\n")


def sweep_section(run_dir: Path, plots: Path) -> str | None:
    meta, arms = _meta(run_dir, "sweep_kd"), run_dir / "sweep_kd" / "arms.md"
    if meta is None or not arms.is_file():
        return None
    m = meta["metrics"]
    return (f"Expert '{m['lang']}': every setting of the space with seeds {m.get('seeds')} (paired; same steps; no "
            f"early stopping unless `distill.sweep.early_stop`), {m['trials']} trials ({m['failed']} failed). "
            f"Mean ± sd over seeds; settings are ranked on validation, compared on test (claims 1 and 2):\n\n"
            + arms.read_text())


def router_section(run_dir: Path, plots: Path) -> str | None:
    meta = _meta(run_dir, "router")
    if meta is None:
        return None
    from mome_ray.router.evaluate import summary_lines  # sklearn and plotting: only when a router is reported

    m = meta["metrics"]
    text = "\n".join(f"- {line}" for line in summary_lines(m))
    text += (f"\n- model: {m['features']} {m['feature_params']} + {m['classifier']} {m['classifier_params']}, "
             f"{m['train_examples']:,} training windows, fitted in {m['fit_seconds']:.1f} s, "
             f"{m['model_bytes'] / 1e6:.1f} MB")
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


# Which stage's artifact records which config section (`stages.stage_config`): the run's config, read back.
CONFIG_SECTIONS = {"corpus": "corpus", "tokenizer": "tokenizer", "teacher": "teacher", "experts": "distill",
                   "router": "router", "moe": "moe", "forgetting": "forgetting"}


def run_settings(run_dir: Path):
    """The run's `Settings` as its stages recorded them; sections of stages that have not run are defaults."""
    from mome_ray.config import from_dict
    from mome_ray.settings import Settings

    data: dict = {}
    for stage, section in CONFIG_SECTIONS.items():
        config = (_meta(run_dir, stage) or {}).get("config", {})
        data |= {k: config[k] for k in ("langs", "seed", "eval") if k in config}
        if section in config:
            data[section] = config[section]
    return from_dict(Settings, data, where="")


def deviations_section(run_dir: Path, plots: Path) -> str:
    from mome_ray.deviations import deviations_markdown, deviations_table

    try:
        cfg = run_settings(run_dir)
    except MomeError as e:  # a run made by a version whose config this one cannot read
        return f"This run's config could not be read back ({e}).\n"
    return ("Every way this run departs from the paper and its public code (PAPER.md), under this run's config "
            "(sections of stages that have not run show the defaults):\n\n" + deviations_markdown(deviations_table(cfg)))


# --- the paper's claims: the data each needs, judged by `claims.py`


def _docs(run_dir: Path, path: str):
    from mome_ray.evaluation import load_doc_losses

    return load_doc_losses(run_dir / path) if (run_dir / path).is_file() else None


def _eval_cfg(run_dir: Path, stage: str):
    from mome_ray.config import from_dict
    from mome_ray.evaluation import EvalConfig

    return from_dict(EvalConfig, (_meta(run_dir, stage) or {}).get("config", {}).get("eval", {}))


def _claims(run_dir: Path) -> list:
    sweep = _csv(run_dir / "sweep_kd" / "results.csv")
    moe = _meta(run_dir, "moe")
    return [
        ("Fixed and adaptive α perform about the same; adaptive marginally better", claims.judge_alpha(sweep)),
        ("Combined α·CE + β·KD is more stable than alternating the losses", claims.judge_combined(sweep)),
        ("The router reaches 99.95 % precision/recall/F1", claims.judge_router((_meta(run_dir, "router") or {})
                                                                               .get("metrics"))),
        ("PLE ≈ JEET; MoE-CE slightly lower; the common expert brings MoE-CE close",
         claims.judge_moe(_docs(run_dir, "moe/grid_docs.npz"), (moe or {}).get("metrics", {}).get("routing", "router"),
                          _eval_cfg(run_dir, "moe"))),
        ("Sequential training forgets; balanced batches and the MoE do not",
         claims.judge_forgetting(_csv(run_dir / "forgetting" / "forgetting.csv"),
                                 _docs(run_dir, "forgetting/test_docs.npz"), _eval_cfg(run_dir, "forgetting"))),
    ]


SECTIONS: list[tuple[str, str, Callable]] = [
    ("Corpus", "corpus", corpus_section),
    ("Teacher", "teacher", teacher_section),
    ("Knowledge distillation", "experts", kd_section),
    ("Experts vs teacher", "experts", experts_section),
    ("KD sweep", "sweep_kd", sweep_section),
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
    for i, (text, claim) in enumerate(_claims(run_dir), 1):
        rows.append(f"| {i} | {text} | {claim.text()} | **{claim.verdict}** |")
    parts.append("## The paper's claims\n\n" + "\n".join(rows) + "\n\n" + claims.RULES + "\n")
    parts.append("## Deviations from the paper\n\n" + deviations_section(run_dir, plots))
    path = run_dir / "report.md"
    path.write_text("\n".join(parts))
    return path
