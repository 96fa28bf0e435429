"""The evaluation grid: every MoE variant under every routing option, beside the baselines, per language.

    rows = moe_rows("JEET", MoE(JEETModel.load(run/"moe/jeet")), route_for, top_k=2) + baseline_rows(...)
    df, docs = evaluate_grid(rows, sets, cfg.eval)   # sets = evaluation.eval_sets(...): the same test blocks
    write_table(grid_markdown_frame(df), out, "grid")    # every row: perplexity [95 % interval] per language

A row answers every language with a model: `modules(lang)` returns something called like an HF causal LM
(`module(input_ids=ids).logits`). For an MoE that is `moe.Routed` under one option of the paper's
grid (router top-1 ± common, each expert forced ± common, common alone, uniform average ± common: the mean
of the experts' distributions and, where they share the head (JEET, MoE-CE), of their last hidden states;
each natural language's expert paired with each code language's) plus top-k mixing (beyond the paper).
Per language: loss, perplexity with its 95 % bootstrap interval by document (`evaluation.py`) and the seconds the evaluation took; per row: active parameters (what one sequence runs
through) and total parameters.

Routing: `route_for(run_dir, names, tokenizer_dir)` uses the router artifact (RUN_DIR/router) when there is
one, else an oracle that routes every evaluation block to its true language; the grid says which.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mome_ray.moe import MoE, Routed, Router, Routing, text_router
from mome_ray.training import process_device


MEANS = {"probs": "distribution mean", "hidden": "hidden mean"}  # how a row's label names its `mix`


@dataclass
class GridRow:
    model: str  # "PLE", "JEET", "MoE-CE", "teacher", ...
    row: str  # the option: "router top-1", "expert fr forced + common", ...
    modules: Callable[[str], nn.Module]  # language -> the module that answers for it
    active: int  # parameters one sequence runs through
    total: int  # parameters of the whole model


def oracle_router(index: int, n_experts: int) -> Router:
    """Every sequence to expert `index` (the true language of a validation block)."""
    return lambda ids, mask=None: Routing.onehot(torch.full((len(ids),), index, device=ids.device), n_experts)


def route_for(run_dir: Path, names: list[str], tokenizer_dir: Path) -> tuple[str, Callable[[str], Router]]:
    """("router" | "oracle", language -> Router). The only place the MoE meets the router artifact (issue 4).

    With RUN_DIR/router: `load_router(...).predict_proba(texts)` -> (labels, probs) on each block's decoded
    text (`moe.text_router`; a most-probable `unknown` goes to the common expert, or the best expert).
    Without it: the oracle, each block routed to the language it was drawn from.
    """
    if (Path(run_dir) / "router" / "meta.json").is_file():
        from mome_ray.router import load_router
        from mome_ray.tokenizer import load_tokenizer

        router = text_router(load_router(Path(run_dir) / "router"), load_tokenizer(tokenizer_dir), names)
        return "router", lambda lang: router
    return "oracle", lambda lang: oracle_router(names.index(lang), len(names))


def moe_rows(model: str, moe: MoE, route: Callable[[str], Router], routing: str, top_k: int,
             code_langs: Sequence[str] = ()) -> list[GridRow]:
    """The paper's grid for one MoE (+ top-k mixing); ± common only where the MoE combines a common stack.

    Averages are labelled by what is averaged: "distribution mean" (any MoE) or "hidden mean" (experts sharing
    the head). With `code_langs`, each other expert X gets the pair row "expert X + <code>", in the MoE's
    default common setting: a hidden mean where the head is shared, else a distribution mean (PLE)."""
    moe.eval()
    total = moe.total_params()
    rows: list[GridRow] = []

    def add(label: str, routed: bool, **select) -> None:
        params = {k: v for k, v in select.items() if k in ("force", "mode", "k", "common")}
        rows.append(GridRow(model, label, lambda lang: Routed(moe, route(lang) if routed else None, **select),
                            moe.active_params(**params), total))

    for common in ([False, True] if moe.experts.combines_common else [False]):
        plus = " + common" if common else ""
        add(f"{routing} top-1{plus}", True, common=common)
        for name in moe.names:
            add(f"expert {name} forced{plus}", False, force=name, common=common)
        add(f"uniform average (distribution mean){plus}", False, force=moe.names, common=common)
        if moe.experts.shares_head:
            add(f"uniform average (hidden mean){plus}", False, force=moe.names, common=common, mix="hidden")
        add(f"{routing} top-{top_k} mix{plus}", True, mode="topk", k=min(top_k, len(moe.names)), common=common)
    if moe.experts.has_common:
        add("common alone", False, force="common")
    mix = "hidden" if moe.experts.shares_head else "probs"
    plus = " + common" if moe.experts.combines_common else ""
    for code in [c for c in code_langs if c in moe.names]:
        for name in [n for n in moe.names if n not in code_langs]:
            add(f"expert {name} + {code} ({MEANS[mix]}){plus}", False, force=[name, code], mix=mix)
    return rows


def baseline_rows(models: dict[str, dict[str, Path]], tokenizer_dir: Path) -> list[GridRow]:
    """Whole HF models: {label: {lang: model dir}}; each directory is loaded once."""
    from mome_ray.models import load_lm, n_params

    loaded: dict[Path, nn.Module] = {}
    rows = []
    for label, dirs in models.items():
        for d in dirs.values():
            if Path(d) not in loaded:
                loaded[Path(d)] = load_lm(d, tokenizer_dir).eval()
        sizes = [n_params(loaded[Path(d)]) for d in dirs.values()]
        rows.append(GridRow(label, "-", lambda lang, dirs=dirs: loaded[Path(dirs[lang])], max(sizes),
                            sum(n_params(loaded[p]) for p in {Path(d) for d in dirs.values()})))
    return rows


def evaluate_grid(rows: list[GridRow], sets: dict, cfg):
    """One record per row (interval columns of `evaluation.interval_columns`, eval seconds, active and total
    parameters) and {"<model> | <row>": {lang: DocLosses}} for paired comparisons; `sets` = {lang: EvalSet}."""
    import pandas as pd

    from mome_ray.evaluation import doc_losses, interval_columns

    device, records, docs = process_device(), [], {}  # the GPU of an evaluation task given one (ray.task_gpus)
    for row in rows:
        t0, losses = time.perf_counter(), {}
        for lang, es in sets.items():
            losses[lang] = doc_losses(row.modules(lang).to(device), es, device, cfg.batch_size)
        docs[f"{row.model} | {row.row}"] = losses
        records.append({"model": row.model, "row": row.row} | interval_columns(losses, cfg)
                       | {"eval_s": round(time.perf_counter() - t0, 2), "active_params": row.active,
                          "total_params": row.total})
    return pd.DataFrame(records), docs


def grid_markdown_frame(df):
    """The grid as shown: perplexity [95 % interval] per language and mean, eval time, parameters in millions."""
    from mome_ray.evaluation import shown

    langs = [c.removeprefix("ppl/") for c in df.columns if c.startswith("ppl/")]
    out = shown(df.drop(columns=["active_params", "total_params"]), langs)
    out["active_M"] = (df["active_params"] / 1e6).round(3)
    out["total_M"] = (df["total_params"] / 1e6).round(3)
    return out


def run_grid(run_dir: Path, langs: list[str], cfg, eval_cfg, block_size: int, code_langs: Sequence[str] = (),
             log=print) -> tuple:
    """The whole grid of a run: PLE (RUN_DIR/experts/<lang>), JEET and MoE-CE (RUN_DIR/moe/), baselines, on the
    test split (`eval_cfg`: `evaluation.EvalConfig`); the language + code pair rows for `code_langs`.

    `cfg` is the run's `MoEConfig`. Returns (DataFrame, {row: {lang: DocLosses}}, "router" | "oracle").
    """
    from mome_ray.evaluation import eval_sets
    from mome_ray.jeet import JEETModel
    from mome_ray.moe import load_ple

    run_dir, tok_dir = Path(run_dir), Path(run_dir) / "tokenizer"
    experts = run_dir / "experts"
    routing, route = route_for(run_dir, langs, tok_dir)
    rows = baseline_rows({"teacher": {l: run_dir / "teacher" for l in langs}}, tok_dir)
    if (experts / "multilingual" / "config.json").is_file():
        rows += baseline_rows({"multilingual student": {l: experts / "multilingual" for l in langs}}, tok_dir)
    if all((experts / f"nokd-{l}" / "config.json").is_file() for l in langs):
        rows += baseline_rows({"no-KD students": {l: experts / f"nokd-{l}" for l in langs}}, tok_dir)
    rows += moe_rows("PLE", MoE(load_ple({l: experts / l for l in langs})), route, routing, cfg.top_k, code_langs)
    for label, name in (("JEET", "jeet"), ("MoE-CE", "moe-ce")):
        rows += moe_rows(label, MoE(JEETModel.load(run_dir / "moe" / name)), route, routing, cfg.top_k, code_langs)
    sets = eval_sets(tok_dir, langs, block_size, eval_cfg)
    log(f"[moe] evaluation grid: {len(rows)} rows x {len(langs)} languages, {routing} routing, {eval_cfg.split} "
        f"split: " + ", ".join(f"{l} {len(s.blocks)} blocks / {s.n_docs} documents" for l, s in sets.items()))
    df, docs = evaluate_grid(rows, sets, eval_cfg)
    return df, docs, routing
