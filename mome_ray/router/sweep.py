"""Ray Tune sweep over the router's feature pipelines x classifiers x hyperparameters.

    mome sweep router --config configs/small.yaml

Each trial (a function trainable, `router.sweep.cpus_per_trial` CPUs) fits one pipeline on the training
windows and reports, on the validation windows: accuracy, weighted and macro precision/recall/F1, F1 per
language, fit time, predict throughput (texts/s, tokenization included) and serialised model size. The
examples are built once by the driver and shared through the object store. The results table (one row per
trial, best first) is written as CSV + markdown; the stage then refits the best config and saves it as the
router artifact.
"""

from __future__ import annotations

import dataclasses
import time

from mome_ray.errors import MomeError
from mome_ray.router.model import RouterConfig

PARAM_COLUMNS = ("features", "classifier", "params")


def trial_router_config(base: RouterConfig, config: dict) -> RouterConfig:
    """The RouterConfig of one trial: its feature kind and classifier, with only their own parameters."""
    features, classifier = config["features"], config["classifier"]
    return dataclasses.replace(base, features=features, classifier=classifier,
                               feature_params=dict(config.get("feature_params", {}).get(features, {})),
                               classifier_params=dict(config.get("classifier_params", {}).get(classifier, {})))


def trial_fn(config: dict, base: dict, run: str, data: tuple) -> None:
    """One trial: fit on (train texts, labels), report the validation metrics."""
    from ray import tune

    from mome_ray.config import from_dict
    from mome_ray.router.evaluate import scores, throughput
    from mome_ray.router.model import fit_router
    from mome_ray.router.store import model_bytes
    from mome_ray.storage import RunStore
    from mome_ray.tokenizer import load_tokenizer

    cfg = trial_router_config(from_dict(RouterConfig, base), config)
    train_x, train_y, val_x, val_y = data
    t0 = time.perf_counter()
    router = fit_router(cfg, train_x, train_y, load_tokenizer(RunStore(run).fetch("tokenizer")))  # this node's copy
    fit_s = time.perf_counter() - t0
    s = scores(val_y, router.predict(val_x), router.classes)
    metrics = {f"val_{k}": v for k, v in s.items() if isinstance(v, float)}
    metrics.update({f"val_f1_{lang}": v for lang, v in s["f1_per_lang"].items()})
    metrics.update({"fit_s": fit_s, "seq_per_s": throughput(router, val_x, repeats=1),
                    "model_kb": len(model_bytes(router)) / 1024})
    tune.report(metrics)


def results_frame(grid, metric: str):
    """One row per trial: what it tried, then its metrics; best first."""
    import pandas as pd

    rows = []
    for result in grid:
        if result.error or not result.metrics:
            continue
        cfg = result.config
        params = {**cfg.get("feature_params", {}).get(cfg["features"], {}),
                  **cfg.get("classifier_params", {}).get(cfg["classifier"], {})}
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        metrics = {k: v for k, v in result.metrics.items() if k.startswith("val_") or k in ("fit_s", "seq_per_s", "model_kb")}
        rows.append({"features": cfg["features"], "classifier": cfg["classifier"], "params": shown, **metrics,
                     "_config": cfg})
    if not rows:
        errors = [str(r.error) for r in grid if r.error]
        raise MomeError(f"every router trial failed; first error: {errors[0] if errors else 'no metrics reported'}")
    df = pd.DataFrame(rows).sort_values([metric, "seq_per_s"], ascending=False).reset_index(drop=True)
    return df


def sweep_router(base: RouterConfig, run: str, data: tuple, storage: str, callbacks: list, log=print):
    """Run the sweep (restored when an interrupted run of the same sweep exists); returns (the results
    DataFrame, the best trial's RouterConfig)."""
    from ray import tune

    from mome_ray.config import to_dict
    from mome_ray.launch import run_name
    from mome_ray.storage import RunStore
    from mome_ray.sweeps import fit_sweep, load_space, max_concurrent, restore_or_new, to_tune

    sweep = base.sweep
    space = load_space(sweep.space)
    for key in ("features", "classifier"):
        if key not in space:
            raise MomeError(f"search space '{sweep.space}' has no '{key}' entry; see tune_spaces/router.yaml")
    store = RunStore(run)
    name = run_name(store, "sweep-router", {"base": to_dict(base), "space": space},
                    {"tokenizer": store.meta("tokenizer")["created"]})
    path = f"{storage.rstrip('/')}/{name}"
    trainable = tune.with_resources(tune.with_parameters(trial_fn, base=to_dict(base), run=run, data=data),
                                    {"CPU": sweep.cpus_per_trial})
    concurrent = max_concurrent({"CPU": sweep.cpus_per_trial}, sweep.max_concurrent)
    log(f"sweeping '{sweep.space}' ({sweep.num_samples} sample(s) per grid point, {concurrent} trial(s) at once) "
        f"into {path} ...")
    tuner = restore_or_new(path, trainable, lambda: tune.Tuner(
        trainable,
        param_space=to_tune(space),
        tune_config=tune.TuneConfig(metric=sweep.metric, mode="max", num_samples=sweep.num_samples,
                                    max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=callbacks, verbose=0),
    ), log)
    df = results_frame(fit_sweep(tuner), sweep.metric)
    best = trial_router_config(base, df["_config"][0])
    return df.drop(columns="_config"), best
