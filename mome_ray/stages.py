"""The pipeline's stages: each reads its parents through `meta.json` and writes RUN_DIR/<stage>/.

A stage is skipped by `run_pipeline` when its artifact was made with the same config from the same
parents. RUN_DIR is a local folder, a shared mount or a URI (`storage.RunStore`). The driver only
orchestrates: heavy work (corpus extraction, tokenizer training, the router, every evaluation) runs as a
Ray task with `ray.task_cpus` / `ray.task_gpus` (`cluster.on_cluster`; in-process on a laptop without
Ray), training runs on Ray Train, and every Ray process fetches the artifacts it reads from the run's storage.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from mome_ray.artifacts import is_complete, read_meta, stage_writer, write_meta
from mome_ray.cluster import in_ray_job, init_ray, on_cluster, on_cluster_map, resolve_run_dir
from mome_ray.config import to_dict
from mome_ray.corpus.build import SPLITS, build_corpus, corpus_sources, print_balance
from mome_ray.corpus.fetch import fetch_packages
from mome_ray.langs import resolve_langs
from mome_ray.settings import Settings
from mome_ray.storage import RunStore, fetch_tree, is_uri
from mome_ray.training import perplexity


SCORED = ("distill", "moe", "forgetting")  # sections whose stage scores models on the test split (`eval`)


def stage_config(cfg: Settings, stage: str) -> dict:
    """The part of the config a stage depends on (a change re-runs it)."""
    scored = {"eval": to_dict(cfg.eval)} if stage in SCORED else {}
    if stage == "teacher_logits":  # which KD runs read it, and the blocks they read
        from mome_ray.logit_cache import users

        scored = {"used_by": users(cfg), "block_size": cfg.distill.model.n_positions}
    return {"langs": cfg.langs, "seed": cfg.seed, stage: to_dict(getattr(cfg, stage))} | scored


def parent_stamps(run: RunStore, parents: list[str]) -> dict[str, str]:
    return {p: read_meta(run, p)["created"] for p in parents}


def parents_of(run: RunStore, stage: str) -> dict[str, str]:
    """The stamps of `stage`'s parents (declared once, in STAGES): what its artifacts record and depend on."""
    return parent_stamps(run, STAGES[stage][1])


def fetch(cfg: Settings, log=print) -> dict[str, str]:
    """Download and unpack the Debian packages the configured sources need."""
    langs = resolve_langs(cfg.langs, cfg.corpus.code_langs, cfg.corpus.stopwords)
    packages = sorted({p for s in corpus_sources(cfg.corpus, langs) for p in s.packages})
    if not packages:
        log("no Debian packages needed by these sources")
        return {}
    return fetch_packages(packages, Path(cfg.corpus.cache_dir))


def _quiet_datasets() -> None:
    import datasets

    datasets.disable_progress_bars()


def corpus(cfg: Settings, log=print) -> dict:
    store = resolve_run_dir(cfg.run_dir)
    corpus_cfg = cfg.corpus
    if not in_ray_job() and not Path(corpus_cfg.cache_dir).is_absolute():  # a laptop's cache, not a job's copy
        corpus_cfg = dataclasses.replace(corpus_cfg, cache_dir=str(Path(corpus_cfg.cache_dir).absolute()))
    if corpus_cfg.user_dir and not is_uri(corpus_cfg.user_dir):
        corpus_cfg = dataclasses.replace(corpus_cfg, user_dir=str(Path(corpus_cfg.user_dir).absolute()))
    manifest, meta = on_cluster(_build_corpus, cfg, corpus_cfg, store, cpus=max(cfg.ray.task_cpus, 1),
                                name="corpus", log=log)
    print_balance(manifest, log)
    return meta


def _build_corpus(cfg: Settings, corpus_cfg, store: RunStore, log=print) -> tuple[dict, dict]:
    """The corpus stage's work, on whichever node runs it: fetch the sources, extract, clean, balance, publish."""
    _quiet_datasets()
    t0 = time.perf_counter()
    if corpus_cfg.user_dir and is_uri(corpus_cfg.user_dir):
        corpus_cfg = dataclasses.replace(corpus_cfg, user_dir=str(fetch_tree(corpus_cfg.user_dir)))
    if not corpus_cfg.user_dir:
        fetch(dataclasses.replace(cfg, corpus=corpus_cfg), log)
    with stage_writer(store, "corpus") as out:
        manifest = build_corpus(corpus_cfg, cfg.langs, cfg.seed, out, log=log)
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
        metrics = {"seconds": round(time.perf_counter() - t0, 1),
                   "max_over_min": {s: manifest["splits"][s]["max_over_min"] for s in SPLITS}}
        meta = write_meta(out, "corpus", stage_config(cfg, "corpus"), metrics, {}, cfg.seed)
    return manifest, meta


def tokenizer(cfg: Settings, log=print) -> dict:
    store = resolve_run_dir(cfg.run_dir)
    parents = parents_of(store, "tokenizer")
    meta = on_cluster(_train_tokenizer, cfg, store, parents, cpus=cfg.ray.task_cpus, name="tokenizer", log=log)
    counts = meta["metrics"]["bpe_tokens"]
    log(f"vocab {meta['metrics']['vocab_size']}; BPE tokens per language (train): "
        + ", ".join(f"{lang} {n:,}" for lang, n in counts["train"].items()))
    return meta


def _train_tokenizer(cfg: Settings, store: RunStore, parents: dict, log=print) -> dict:
    from datasets import load_from_disk

    from mome_ray.tokenizer import encode_stream, token_path, train_tokenizer

    _quiet_datasets()
    data = load_from_disk(str(store.fetch("corpus") / "data"))
    t0 = time.perf_counter()
    with stage_writer(store, "tokenizer") as out:
        log(f"training byte-level BPE ({cfg.tokenizer.vocab_size} tokens) on {len(data['train'])} documents ...")
        tok = train_tokenizer((t for t in data["train"]["text"]), cfg.tokenizer)
        tok.save_pretrained(str(out))
        counts: dict[str, dict[str, int]] = {}
        for split in SPLITS:
            # One read of the split's columns; `Dataset.filter` would rescan it per language and write
            # cache files into the corpus artifact.
            rows = list(zip(data[split]["lang"], data[split]["text"]))
            counts[split] = {}
            for lang in cfg.langs:
                stream = encode_stream(tok, [text for code, text in rows if code == lang])
                path = token_path(out, split, lang)
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, stream)
                counts[split][lang] = int(len(stream))
        metrics = {"vocab_size": len(tok), "bpe_tokens": counts, "seconds": round(time.perf_counter() - t0, 1)}
        return write_meta(out, "tokenizer", stage_config(cfg, "tokenizer"), metrics, parents, cfg.seed)


def teacher(cfg: Settings, fresh: bool = False, log=print) -> dict:
    from mome_ray.teacher import train_teacher

    store = resolve_run_dir(cfg.run_dir)
    parents = parents_of(store, "teacher")
    init_ray(cfg.ray)
    with stage_writer(store, "teacher") as out:
        metrics = train_teacher(cfg.teacher, cfg.langs, store, cfg.ray, parents, cfg.seed, out, fresh=fresh)
        meta = write_meta(out, "teacher", stage_config(cfg, "teacher"), metrics, parents, cfg.seed)
    print_perplexity_table(metrics, cfg.langs, log)
    return meta


def teacher_logits(cfg: Settings, log=print) -> dict:
    """Cache the teacher's top-k log-probs of every language's training blocks (one Ray task per language) in
    RUN_DIR/teacher_logits/<lang>/; only a meta.json saying so when no KD run reads them."""
    from mome_ray.logit_cache import cache_language, users

    store = resolve_run_dir(cfg.run_dir)
    parents = parents_of(store, "teacher_logits")
    config = stage_config(cfg, "teacher_logits")
    if not users(cfg):
        log("no KD run reads cached teacher logits (distill.teacher and moe.teacher are online): nothing to compute")
        with stage_writer(store, "teacher_logits", nested=True) as out:
            reason = "distill.teacher and moe.teacher are online"
            return write_meta(out, "teacher_logits", config, {"skipped": reason}, parents, cfg.seed)
    init_ray(cfg.ray)
    jobs = [(cfg.teacher_logits, lang, store, cfg.distill.model.n_positions, config, parents, cfg.seed)
            for lang in cfg.langs]
    metas = on_cluster_map(cache_language, jobs, cpus=cfg.ray.task_cpus, gpus=cfg.ray.task_gpus,
                           name="teacher-logits", log=log)
    with stage_writer(store, "teacher_logits", nested=True) as out:
        metrics = {lang: m["metrics"] for lang, m in zip(cfg.langs, metas)}
        meta = write_meta(out, "teacher_logits", config, metrics, parents, cfg.seed)
    log(f"teacher logits cached in {store.uri('teacher_logits')}: "
        + ", ".join(f"{l} {m['blocks']} blocks ({m['bytes'] / 2**20:,.0f} MiB)" for l, m in metrics.items()))
    return meta


def print_perplexity_table(metrics: dict, langs: list[str], log=print) -> None:
    """Per-language validation perplexity: untrained model vs trained."""
    before, after = metrics["untrained"], metrics["final"]
    log(f"\n{'lang':<6}{'untrained ppl':>15}{'teacher ppl':>14}")
    for lang in langs:
        log(f"{lang:<6}{before[f'val_ppl/{lang}']:>15,.1f}{after[f'val_ppl/{lang}']:>14,.2f}")
    log(f"{'mean':<6}{perplexity(before['val_loss']):>15,.1f}{perplexity(after['val_loss']):>14,.2f}")


def experts(cfg: Settings, fresh: bool = False, log=print) -> dict:
    """Distil one expert per language (+ the baselines) in parallel, then score them all on the same test blocks."""
    from mome_ray import evaluation
    from mome_ray.distill import distill_students
    from mome_ray.sweeps import markdown_table

    store = resolve_run_dir(cfg.run_dir)
    parents = parents_of(store, "experts")
    init_ray(cfg.ray)
    metas = distill_students(cfg.distill, cfg.langs, store, cfg.ray, parents, cfg.seed, fresh, log)
    table, docs = on_cluster(expert_table, cfg, store, list(metas), cpus=cfg.ray.task_cpus,
                             gpus=cfg.ray.task_gpus, name="expert-table", log=log)
    shown = markdown_table(evaluation.shown(table, cfg.langs))
    with stage_writer(store, "experts", nested=True) as out:
        table.to_csv(out / "eval.csv", index=False)
        evaluation.save_doc_losses(out / "eval_docs.npz", docs)
        (out / "eval.md").write_text(shown)
        metrics = {"students": {name: m["metrics"]["final"] for name, m in metas.items()},
                   "eval": table.to_dict(orient="records")}
        meta = write_meta(out, "experts", stage_config(cfg, "distill"), metrics, parents, cfg.seed)
    log(f"\n{cfg.eval.split} perplexity [95 % interval], every model on the same blocks:\n" + shown)
    return meta


def expert_table(cfg: Settings, store: RunStore, names: list[str], log=print):
    """Teacher, experts, no-KD students and the multilingual student: one perplexity table (a Ray task)."""
    from mome_ray.evaluation import Row, perplexity_table

    with store.view(["tokenizer", "teacher", "experts/*"]) as run_dir:
        out = run_dir / "experts"
        d = cfg.distill
        rows = [Row("teacher", {l: run_dir / "teacher" for l in cfg.langs})]
        experts = {l: out / l for l in cfg.langs if l in names}
        if experts:
            rows.append(Row(f"experts (KD {d.kd_loss}, {d.alpha.strategy} alpha)", experts))
        nokd = {l: out / f"nokd-{l}" for l in cfg.langs if f"nokd-{l}" in names}
        if nokd:
            rows.append(Row("no-KD students (CE only)", nokd))
        if "multilingual" in names:
            rows.append(Row("multilingual student (KD, equal compute)", {l: out / "multilingual" for l in cfg.langs}))
        if "multilingual-tokens" in names:
            rows.append(Row("multilingual student (KD, equal tokens)",
                            {l: out / "multilingual-tokens" for l in cfg.langs}))
        return perplexity_table(rows, run_dir / "tokenizer", cfg.langs, d.model.n_positions, cfg.eval)


def sweep_kd(cfg: Settings, log=print) -> dict:
    """Ray Tune over alpha strategy x KD loss x temperature; results and best config in RUN_DIR/sweep_kd."""
    from mome_ray.kd_sweep import sweep_kd as run_sweep

    store = resolve_run_dir(cfg.run_dir)
    parents = parents_of(store, "sweep_kd")  # a sweep over the experts' recipe: the experts' parents
    init_ray(cfg.ray)
    with stage_writer(store, "sweep_kd") as out:
        metrics = run_sweep(cfg, store, parents, out, log)
        meta = write_meta(out, "sweep_kd", stage_config(cfg, "distill"), metrics, parents, cfg.seed)
        log((out / "results.md").read_text())
    return meta


def _holdout_sources(cfg: Settings) -> set[str]:
    return set() if cfg.corpus.user_dir else {s.name for s in cfg.corpus.sources if s.holdout}


def router(cfg: Settings, log=print) -> dict:
    """Train the configured router on the train split; evaluate it on the test split's hard cases."""
    from mome_ray.router.evaluate import summary_lines

    store = resolve_run_dir(cfg.run_dir)
    parents = parents_of(store, "router")
    meta = on_cluster(_train_router, cfg, store, parents, cpus=cfg.ray.task_cpus, name="router", log=log)
    for line in summary_lines(meta["metrics"]):
        log(line)
    log(f"router saved in {store.uri('router')} (confusion.png beside it)")
    return meta


def _train_router(cfg: Settings, store: RunStore, parents: dict, log=print) -> dict:
    from mome_ray.router.train import train_router

    with store.view(["corpus", "tokenizer"]) as run_dir, stage_writer(store, "router") as out:
        metrics = train_router(cfg.router, cfg.langs, run_dir, _holdout_sources(cfg), cfg.seed, out, log)
        return write_meta(out, "router", stage_config(cfg, "router"), metrics, parents, cfg.seed)


def sweep_router(cfg: Settings, log=print) -> dict:
    """Ray Tune over features x classifiers; the best pipeline becomes the router artifact."""
    from mome_ray.cluster import storage_path
    from mome_ray.router.evaluate import summary_lines
    from mome_ray.router.train import sweep_and_train

    store = resolve_run_dir(cfg.run_dir)
    parents = parents_of(store, "router")
    init_ray(cfg.ray)
    with store.view(["corpus", "tokenizer"]) as run_dir, stage_writer(store, "router") as out:
        metrics = sweep_and_train(cfg.router, cfg.langs, run_dir, _holdout_sources(cfg), cfg.seed, out,
                                  storage_path(cfg.ray, store), store.location, log)
        # Not the configured router: the pipeline re-runs `router` over it (put the best config in the YAML).
        config = {**stage_config(cfg, "router"), "made_by": "mome sweep router"}
        meta = write_meta(out, "router", config, metrics, parents, cfg.seed)
    for line in summary_lines(metrics):
        log(line)
    log(f"router (best of the sweep) saved in {store.uri('router')}; table in sweep_results.md")
    return meta


def moe(cfg: Settings, fresh: bool = False, log=print) -> dict:
    """Train JEET and MoE-CE (KD on Ray Train), assemble PLE from the experts, run the evaluation grid."""
    from mome_ray.evaluation import save_doc_losses
    from mome_ray.grid import grid_markdown_frame
    from mome_ray.moe_train import train_moes
    from mome_ray.sweeps import markdown_table

    store = resolve_run_dir(cfg.run_dir)
    parents = parents_of(store, "moe")
    init_ray(cfg.ray)
    t0 = time.perf_counter()
    # JEET / MoE-CE are KD runs: they depend on what the experts depend on (tokenizer, teacher), not on them
    metas = train_moes(cfg.moe, cfg.langs, store, cfg.ray, parents_of(store, "experts"), cfg.seed, fresh, log)
    t1 = time.perf_counter()
    grid, docs, routing = on_cluster(_run_grid, cfg, store, cpus=cfg.ray.task_cpus, gpus=cfg.ray.task_gpus,
                                     name="moe-grid", log=log)
    shown = markdown_table(grid_markdown_frame(grid))
    with stage_writer(store, "moe", nested=True) as out:
        grid.to_csv(out / "grid.csv", index=False)  # everything: losses, perplexities, exact parameter counts
        save_doc_losses(out / "grid_docs.npz", docs)  # per-document losses: paired comparisons in the report
        (out / "grid.md").write_text(shown)
        ple = {"experts": {l: f"experts/{l}" for l in cfg.langs}, "router": "router" if routing == "router" else None}
        (out / "ple.json").write_text(json.dumps(ple, indent=2))
        metrics = {"routing": routing, "train_seconds": round(t1 - t0, 1),
                   "grid_seconds": round(time.perf_counter() - t1, 1),
                   "trained": {name: m["metrics"]["final"] for name, m in metas.items()},
                   "grid": grid.to_dict(orient="records")}
        meta = write_meta(out, "moe", stage_config(cfg, "moe"), metrics, parents, cfg.seed)
    log(f"\nevaluation grid ({routing} routing; {cfg.eval.split} perplexity [95 % interval] per language, same "
        f"blocks for every row):\n"
        + shown)
    return meta


def _run_grid(cfg: Settings, store: RunStore, log=print):
    from mome_ray.grid import run_grid

    with store.view(["tokenizer", "router", "teacher", "experts/*", "moe/*"]) as run_dir:
        return run_grid(run_dir, cfg.langs, cfg.moe, cfg.eval,
                        min(cfg.moe.model.n_positions, cfg.distill.model.n_positions), cfg.corpus.code_langs, log)


def forgetting(cfg: Settings, log=print) -> dict:
    """Sequential, balanced, JEET and separate experts on the same budget: per-language forgetting (Ray Train)."""
    from mome_ray.forgetting import forgetting_study

    store = resolve_run_dir(cfg.run_dir)
    parents = parents_of(store, "forgetting")
    init_ray(cfg.ray)
    t0 = time.perf_counter()
    with stage_writer(store, "forgetting", nested=True) as out:  # beside the regimes' models
        metrics = forgetting_study(cfg.forgetting, cfg.langs, store, cfg.ray, parents, cfg.seed, out, cfg.eval, log)
        metrics["seconds"] = round(time.perf_counter() - t0, 1)
        meta = write_meta(out, "forgetting", stage_config(cfg, "forgetting"), metrics, parents, cfg.seed)
        log("\n" + (out / "forgetting.md").read_text())
    return meta


SWEEPS = {"kd": sweep_kd, "router": sweep_router}

# artifact -> (function, parent artifacts, config section)
STAGES = {
    "corpus": (corpus, [], "corpus"),
    "tokenizer": (tokenizer, ["corpus"], "tokenizer"),
    "router": (router, ["corpus", "tokenizer"], "router"),
    "teacher": (teacher, ["tokenizer"], "teacher"),
    "teacher_logits": (teacher_logits, ["tokenizer", "teacher"], "teacher_logits"),
    "experts": (experts, ["tokenizer", "teacher", "teacher_logits"], "distill"),
    "sweep_kd": (sweep_kd, ["tokenizer", "teacher", "teacher_logits"], "distill"),
    "moe": (moe, ["tokenizer", "router", "teacher", "teacher_logits", "experts"], "moe"),
    "forgetting": (forgetting, ["tokenizer", "router"], "forgetting"),
}


def run_pipeline(cfg: Settings, force: bool = False, log=print) -> dict[str, float]:
    """Every stage in order (a stage whose artifact matches its config and parents is skipped), then the
    report; returns the seconds each stage took."""
    from mome_ray.report import write_report

    store = resolve_run_dir(cfg.run_dir)
    seconds = {}
    for name, (fn, parents, section) in STAGES.items():
        done = is_complete(store, name, stage_config(cfg, section))
        if done and not force and read_meta(store, name)["parents"] == parent_stamps(store, parents):
            log(f"== {name}: up to date in {store.uri(name)}, skipped")
            continue
        log(f"== {name}")
        t0 = time.perf_counter()
        fn(cfg, log=log)
        seconds[name] = round(time.perf_counter() - t0, 1)
        log(f"== {name}: done in {seconds[name]:.0f} s")
    log(f"\nrun directory: {store.location}")
    log(f"report: {write_report(store)}")
    return seconds
