"""Ray Tune over the distillation recipe: alpha strategy × KD loss × temperature, for one language's expert.

    mome sweep kd --config configs/small.yaml
    mome sweep kd --config configs/small.yaml distill.sweep.lang=de distill.sweep.max_steps=100

Each trial is a Tune function trainable that builds a `TorchTrainer` for the expert and calls `fit()` —
the Train V2 pattern (`Tuner(TorchTrainer)` is not supported). Train's reports reach Tune through
`TuneReportCallback`, so ASHA stops trials whose validation perplexity lags. The trial function asks Tune
for almost no CPU: the Train workers hold the real resources, and `max_concurrent_trials` keeps the
number of trials at what the cluster fits. Writes RUN_DIR/sweep_kd/: results.csv + results.md (one row
per trial, best first) and best_config.yaml; Tune's CSV/JSON/TensorBoard logs stay under the storage path.
"""

from __future__ import annotations

from pathlib import Path

from mome_ray.cluster import RayConfig, storage_path
from mome_ray.config import deep_merge, from_dict, to_dict
from mome_ray.distill import DistillConfig, Student, loop_config, train_fn_per_worker
from mome_ray.errors import MomeError
from mome_ray.storage import RunStore

SEARCHED = ("alpha", "kd_loss", "temperature")


def trial_fn(config: dict) -> None:
    """One trial: distil the sweep language's expert with this trial's recipe; Train reports go to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from mome_ray.launch import fit

    cfg = from_dict(DistillConfig, deep_merge(config["base"], config["params"]))
    store, lang = RunStore(config["run"]), config["lang"]
    # A restored sweep re-runs an unfinished trial under its old id: its Train run resumes from its checkpoint.
    name = f"{config['sweep']}-{tune.get_context().get_trial_id()}"
    fit(train_fn_per_worker, loop_config(cfg, Student(lang, [lang], True), store, config["seed"], name),
        cfg.scaling, from_dict(RayConfig, config["ray"]), store, name, keep=1, callbacks=(TuneReportCallback(),))


def check_space(space: dict) -> None:
    unknown = sorted(set(space) - set(SEARCHED))
    if unknown:
        raise MomeError(f"kd search space: unknown keys {unknown}; it may set {list(SEARCHED)}")


def results_frame(grid):
    """One row per trial: the recipe, its last and best validation perplexity, and how far it ran."""
    import pandas as pd

    rows = []
    for r in grid:
        p = r.config["params"]
        alpha = p.get("alpha", {})
        history = r.metrics_dataframe
        rows.append({
            "strategy": alpha.get("strategy", "fixed"),
            "alpha": alpha.get("alpha", "") if alpha.get("strategy", "fixed") == "fixed" else "",
            "kd_loss": p.get("kd_loss", ""),
            "temperature": p.get("temperature", ""),
            "val_ppl": (r.metrics or {}).get("val_ppl", float("nan")),
            "best_val_ppl": float(history["val_ppl"].min()) if history is not None and "val_ppl" in history
            else float("nan"),
            "steps": (r.metrics or {}).get("step", 0),
            "error": type(r.error).__name__ if r.error else "",
        })
    return pd.DataFrame(rows).sort_values("val_ppl", na_position="last").reset_index(drop=True)


def sweep_kd(cfg, store: RunStore, parents: dict, out_dir: Path, log=print) -> dict:
    """Run the sweep on the connected cluster; write the results into `out_dir`; returns the stage metrics.

    The sweep's name carries a fingerprint of its space, base config and parents: run again after a kill,
    the same sweep is restored (`Tuner.restore`: finished trials kept, unfinished ones resumed); a changed
    sweep starts a new one."""
    import yaml
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from mome_ray.kd import check_teacher
    from mome_ray.launch import run_name, run_resources, wait_for_room
    from mome_ray.sweeps import (TRIAL_CPU, fit_sweep, load_space, max_concurrent, restore_or_new, to_tune,
                                 tracking_callbacks, write_table)

    d: DistillConfig = cfg.distill
    s = d.sweep
    lang = s.lang or cfg.langs[0]
    if lang not in cfg.langs:
        raise MomeError(f"distill.sweep.lang '{lang}' is not a language of this run ({cfg.langs})")
    check_teacher(d, store)
    space = load_space(s.space)
    check_space(space)
    base = to_dict(d)
    if s.max_steps:
        base["train"]["max_steps"] = s.max_steps
    evals = -(-base["train"]["max_steps"] // d.train.eval_every)  # reports per trial
    wait_for_room(d.scaling, "a sweep trial", cfg.ray.wait_for_resources_s, log)
    need = run_resources(d.scaling)  # a trial's workers, CPUs and GPUs, + the trial's own CPU share
    width = max_concurrent({**need, "CPU": need["CPU"] + TRIAL_CPU}, s.max_concurrent)
    storage = storage_path(cfg.ray, store)
    fixed = {"base": base, "lang": lang, "seed": cfg.seed, "run": store.location, "ray": to_dict(cfg.ray)}
    name = run_name(store, "sweep-kd", {**fixed, "space": space, "sweep": to_dict(s)}, parents)
    trainable = tune.with_resources(trial_fn, {"CPU": TRIAL_CPU})
    path = f"{storage.rstrip('/')}/{name}"
    log(f"[sweep kd] expert '{lang}', {base['train']['max_steps']} steps per trial, {width} trials at a time, "
        f"ASHA on val_ppl (grace {s.grace_period} of {evals} evaluations); {path}")
    tuner = restore_or_new(path, trainable, lambda: tune.Tuner(
        trainable,
        param_space={"params": to_tune(space), **fixed, "sweep": name},
        tune_config=tune.TuneConfig(
            metric="val_ppl", mode="min", num_samples=s.num_samples, max_concurrent_trials=width,
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=evals,
                                    grace_period=min(s.grace_period, evals)),
        ),
        run_config=tune.RunConfig(name=name, storage_path=storage,
                                  callbacks=tracking_callbacks(s.mlflow_uri, f"{store.name}-sweep-kd")),
    ), log)
    grid = fit_sweep(tuner)
    df = results_frame(grid)
    write_table(df, out_dir, "results")
    ok = df[df["error"] == ""]
    if ok.empty:
        raise MomeError(f"every sweep trial failed; see the trial logs under {path}")
    best = grid.get_best_result(metric="val_ppl", mode="min", filter_nan_and_inf=True).config["params"]
    (out_dir / "best_config.yaml").write_text(yaml.safe_dump({"distill": best}, sort_keys=False))
    log(f"[sweep kd] {len(df)} trials; best: {best} (val ppl {ok['val_ppl'].iloc[0]:.2f})")
    return {"trials": len(df), "failed": int((df["error"] != "").sum()), "best": best,
            "best_val_ppl": float(ok["val_ppl"].iloc[0]), "lang": lang,
            "tune_dir": path}
