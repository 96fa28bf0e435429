"""Grow the MoE by one language: distil a new expert from any folder of text, leave the others untouched.

    mome add-expert --config configs/small.yaml --lang es --source ~/texts/spanish

1. The folder's text is cleaned and split by document like the corpus (`corpus.build`, the run's
   `corpus` settings), then encoded with the run's fixed tokenizer into RUN_DIR/tokenizer/tokens/<split>/<lang>.npy
   (new files beside the others; the tokenizer itself does not change).
2. One KD expert is distilled from the teacher (`distill`, the run's `distill` settings, no baselines) into
   RUN_DIR/experts/<lang>/ (with `distill.teacher: cached`, after caching the teacher's logits of the new
   language in RUN_DIR/teacher_logits/<lang>/). No other expert's files are opened for writing.
3. If the run has a router, it is retrained on every language, the new one included (the `router` stage).
4. A new MoE artifact RUN_DIR/moe_plus_<lang>/: the PLE over every expert (ple.json) and its grid rows
   (router or oracle top-1, each expert forced, ...) on every language. JEET and MoE-CE share trained
   parts across languages, so growing them means retraining (`mome moe` with the language in `langs`).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np

from mome_ray.errors import MomeError


def encode_language(cfg, lang: str, source: Path, log=print) -> dict:
    """Clean + split `source` as the corpus does; write the new language's token streams; returns the counts."""
    from mome_ray.corpus.build import SPLITS, build_corpus
    from mome_ray.tokenizer import encode_stream, load_tokenizer, token_path

    tok_dir = Path(cfg.run_dir) / "tokenizer"
    tok = load_tokenizer(tok_dir)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "src").mkdir()
        (Path(tmp) / "src" / lang).symlink_to(source.resolve(), target_is_directory=True)
        corpus = dataclasses.replace(cfg.corpus, user_dir=str(Path(tmp) / "src"))
        manifest = build_corpus(corpus, [lang], cfg.seed, Path(tmp) / "out", log=log)
        from datasets import load_from_disk

        data = load_from_disk(str(Path(tmp) / "out" / "data"))
        counts = {}
        for split in SPLITS:
            stream = encode_stream(tok, list(data[split]["text"]))
            np.save(token_path(tok_dir, split, lang), stream)
            counts[split] = int(len(stream))
    log(f"[add-expert] {lang}: BPE tokens " + ", ".join(f"{s} {n:,}" for s, n in counts.items()))
    return {"bpe_tokens": counts, "corpus": manifest["splits"]}


def retrain_router(cfg, langs: list[str], log=print) -> bool:
    """Retrain the run's router on `langs` if the run has one (the `router` stage, issue 4); True if it did."""
    from mome_ray.stages import STAGES

    if not (Path(cfg.run_dir) / "router" / "meta.json").is_file():
        return False
    if "router" not in STAGES:
        raise MomeError("this run has a router but this version of mome has no `router` stage to retrain it")
    STAGES["router"][0](dataclasses.replace(cfg, langs=langs), log=log)
    return True


def add_expert(cfg, lang: str, source: str | Path, log=print) -> dict:
    """Steps 1–4 above; returns the new MoE artifact's meta."""
    from mome_ray.artifacts import read_meta, stage_writer, write_meta
    from mome_ray.cluster import init_ray, resolve_run_dir
    from mome_ray.config import to_dict
    from mome_ray.distill import distill_students
    from mome_ray.stages import parents_of
    from mome_ray.grid import evaluate_grid, grid_markdown_frame, moe_rows, route_for
    from mome_ray.evaluation import eval_sets
    from mome_ray.moe import MoE, load_ple
    from mome_ray.sweeps import markdown_table

    store = resolve_run_dir(cfg.run_dir)
    if store.remote:
        raise MomeError(f"mome add-expert adds files to the run's tokenizer artifact and needs a local or mounted "
                        f"run dir, not '{store.location}'; copy the run to a shared mount, or rebuild the corpus "
                        f"with the language in `langs`")
    run_dir, source = Path(store.location), Path(source)
    if lang in cfg.langs:
        raise MomeError(f"'{lang}' is already a language of this run ({cfg.langs}); its expert comes from "
                        f"'mome distill'")
    if not source.is_dir():
        raise MomeError(f"--source '{source}' is not a folder; give a folder of .txt/.py/.jsonl/.parquet files")
    for stage in ("tokenizer", "teacher"):
        read_meta(run_dir, stage)  # an error naming the command when missing
    langs = list(cfg.langs) + [lang]

    data = encode_language(cfg, lang, source, log)
    init_ray(cfg.ray)
    if cfg.distill.teacher == "cached":  # the new language's teacher logits, beside the others
        from mome_ray.logit_cache import cache_language
        from mome_ray.stages import stage_config

        cache_language(cfg.teacher_logits, lang, store, cfg.distill.model.n_positions,
                       stage_config(cfg, "teacher_logits"), parents_of(store, "teacher_logits"), cfg.seed, log)
    distill = dataclasses.replace(cfg.distill, langs=[lang], baselines=False)
    distill_students(distill, langs, store, cfg.ray, parents_of(store, "experts"), cfg.seed, log=log)
    router = retrain_router(cfg, langs, log)

    experts = {l: run_dir / "experts" / l for l in langs}
    routing, route = route_for(run_dir, langs, run_dir / "tokenizer")
    block = cfg.distill.model.n_positions
    sets = eval_sets(run_dir / "tokenizer", langs, block, cfg.eval)
    grid, _ = evaluate_grid(moe_rows("PLE", MoE(load_ple(experts)), route, routing, cfg.moe.top_k), sets, cfg.eval)
    name = f"moe_plus_{lang}"
    with stage_writer(run_dir, name) as out:
        (out / "ple.json").write_text(json.dumps({"experts": {l: f"experts/{l}" for l in langs},
                                                  "router": "router" if routing == "router" else None}, indent=2))
        grid.to_csv(out / "grid.csv", index=False)
        (out / "grid.md").write_text(markdown_table(grid_markdown_frame(grid)))
        config = {"langs": langs, "seed": cfg.seed, "source": str(source.resolve()), "distill": to_dict(distill)}
        parents = parents_of(store, "experts")
        meta = write_meta(out, name, config, {"routing": routing, "router_retrained": router, **data,
                                              "grid": grid.to_dict(orient="records")}, parents, cfg.seed)
    log(f"\n[add-expert] PLE over {langs} ({routing} routing) in {run_dir / name}:\n"
        + (run_dir / name / "grid.md").read_text())
    return meta
