"""Make the router artifact: build the examples, fit (or sweep, then fit the best), save, evaluate the saved one.

    metrics = train_router(cfg.router, cfg.langs, run_dir, holdout_sources, cfg.seed, out_dir)
    metrics = sweep_and_train(cfg.router, cfg.langs, run_dir, holdout_sources, cfg.seed, out_dir, storage, run)

The evaluation runs on the router as loaded back from `out_dir`, so the numbers are those of the artifact.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from mome_ray.router.evaluate import evaluate_router
from mome_ray.router.examples import test_cases, training_examples
from mome_ray.router.model import RouterConfig, fit_router
from mome_ray.router.shift import shift_set
from mome_ray.router.store import load_router, save_router


def train_router(cfg: RouterConfig, langs: list[str], run_dir: Path, holdout: set[str], seed: int, out: Path,
                 log=print) -> dict:
    """Fit `cfg` on the train split, save it into `out` (+ confusion.png), return its test metrics."""
    from mome_ray.tokenizer import load_tokenizer

    tok_dir = Path(run_dir) / "tokenizer"
    tok = load_tokenizer(tok_dir)
    texts, labels = training_examples(tok, tok_dir, "train", langs, cfg, seed)
    log(f"fitting {cfg.features} + {cfg.classifier} on {len(texts):,} windows of {len(langs)} languages ...")
    t0 = time.perf_counter()
    router = fit_router(cfg, texts, labels, tok, seed)
    fit_s = time.perf_counter() - t0
    info = save_router(router, out)
    shift, versions = shift_set(tok, cfg, langs, run_dir, seed)
    metrics = evaluate_router(load_router(out), {**test_cases(tok, run_dir, langs, cfg, holdout, seed), **shift}, out)
    metrics.update({"features": cfg.features, "feature_params": cfg.feature_params, "classifier": cfg.classifier,
                    "classifier_params": cfg.classifier_params, "train_examples": len(texts),
                    "fit_seconds": round(fit_s, 2), "model_bytes": info["bytes"], "shift_versions": versions})
    return metrics


def sweep_and_train(cfg: RouterConfig, langs: list[str], run_dir: Path, holdout: set[str], seed: int, out: Path,
                    storage: str, run: str, log=print) -> dict:
    """Sweep on train/val windows, write sweep_results.{csv,md} into `out`, then fit and save the best."""
    from mome_ray.router.sweep import sweep_router
    from mome_ray.sweeps import markdown_table, tracking_callbacks, write_table
    from mome_ray.tokenizer import load_tokenizer

    tok_dir = Path(run_dir) / "tokenizer"
    tok = load_tokenizer(tok_dir)
    train = training_examples(tok, tok_dir, "train", langs, cfg, seed)
    val_cfg = dataclasses.replace(cfg, examples_per_lang=max(2, cfg.examples_per_lang // 4))
    val = training_examples(tok, tok_dir, "val", langs, val_cfg, seed)
    df, best = sweep_router(cfg, run, (*train, *val), storage,
                            tracking_callbacks(cfg.sweep.mlflow_uri, "sweep-router"), log)
    write_table(df, out, "sweep_results")
    shown = ["features", "classifier", "params", cfg.sweep.metric, "val_f1_weighted", "fit_s", "seq_per_s", "model_kb"]
    log(markdown_table(df[list(dict.fromkeys(shown))].head(10), floatfmt=".4g"))
    metrics = train_router(best, langs, run_dir, holdout, seed, out, log)
    metrics["sweep"] = {"trials": len(df), "metric": cfg.sweep.metric, "best": df.iloc[0][list(
        ("features", "classifier", "params", cfg.sweep.metric))].to_dict()}
    return metrics
