"""Ray Tune over the distillation recipe: alpha strategy × KD loss × temperature, for one language's expert
(a space may also set JSD's β `jsd_beta` and skew KL's λ `skew`).

    mome sweep kd --config configs/small.yaml          # also a pipeline stage (`sweep_kd`, after `experts`)
    mome sweep kd --config configs/small.yaml distill.sweep.lang=de distill.sweep.max_steps=100

Every setting of the space (an *arm*) runs once per seed of `distill.sweep.seeds`: the arms are paired
(same seeds, so the same initialisations and batches; same steps) and, with `early_stop: false` (the
default), none is stopped early, so the report can compare arms seed by seed (claims 1 and 2). Settings are
selected on validation perplexity; each trial's final model is also scored on the test split (`test_ppl`),
which the claims use. `early_stop: true` adds ASHA for searches that only want the best setting fast.

Each trial is a Tune function trainable that builds a `TorchTrainer` for the expert and calls `fit()` —
the Train V2 pattern (`Tuner(TorchTrainer)` is not supported). Train's reports reach Tune through
`TuneReportCallback`. The trial function asks Tune for almost no CPU: the Train workers hold the real
resources, and `max_concurrent_trials` keeps the number of trials at what the cluster fits. Writes
RUN_DIR/sweep_kd/: results.csv + .md (one row per trial), arms.csv + .md (mean and sd over seeds per
setting, best on validation first) and best_config.yaml; Tune's logs stay under the storage path.
"""

from __future__ import annotations

import json
from pathlib import Path

from mome_ray.alpha import AlphaConfig, check_adapts
from mome_ray.cluster import RayConfig, ScalingArgs, storage_path
from mome_ray.config import deep_merge, from_dict, to_dict
from mome_ray.distill import DistillConfig, Student, loop_config, train_fn_per_worker
from mome_ray.errors import MomeError
from mome_ray.storage import RunStore

SEARCHED = ("alpha", "kd_loss", "temperature", "jsd_beta", "skew")
LOSS_PARAMS = ("jsd_beta", "skew")  # columns of the tables only when the space sets them


def trial_fn(config: dict) -> None:
    """One trial: distil the sweep language's expert with this trial's recipe; Train reports go to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from mome_ray.launch import fit

    cfg = from_dict(DistillConfig, deep_merge(config["base"], config["params"]))
    store, lang = RunStore(config["run"]), config["lang"]
    # A restored sweep re-runs an unfinished trial under its old id: its Train run resumes from its checkpoint.
    name = f"{config['sweep']}-{tune.get_context().get_trial_id()}"
    loop = loop_config(cfg, Student(lang, [lang], True), store, config["seed"], name)
    loop["report_test"] = config["test_blocks"] or -1  # the final model on the test split (-1: every block)
    fit(train_fn_per_worker, loop, cfg.scaling, from_dict(RayConfig, config["ray"]), store, name, keep=1,
        callbacks=(TuneReportCallback(),))


def check_space(space: dict, base_alpha: dict | None = None, steps: int = 0) -> None:
    """Only searchable keys; with `steps`, every α option of the space must be able to act in a trial."""
    unknown = sorted(set(space) - set(SEARCHED))
    if unknown:
        raise MomeError(f"kd search space: unknown keys {unknown}; it may set {list(SEARCHED)}")
    alpha = space.get("alpha", {})
    options = alpha.get("grid") or alpha.get("choice") if isinstance(alpha, dict) else None
    for option in options or [alpha]:
        if steps and isinstance(option, dict):
            check_adapts(from_dict(AlphaConfig, deep_merge(base_alpha or {}, option)), steps,
                         "the kd search space's alpha")


def results_frame(grid):
    """One row per trial: the recipe, its last and best validation perplexity, and how far it ran."""
    import pandas as pd

    rows = []
    for r in grid:
        p = r.config["params"]
        alpha = p.get("alpha", {})
        history = r.metrics_dataframe
        rows.append({
            "seed": r.config.get("seed", ""),
            "strategy": alpha.get("strategy", "fixed"),
            "alpha": alpha.get("alpha", "") if alpha.get("strategy", "fixed") == "fixed" else "",
            "kd_loss": p.get("kd_loss", ""),
            "temperature": p.get("temperature", ""),
            **{k: p[k] for k in LOSS_PARAMS if k in p},
            "val_ppl": (r.metrics or {}).get("val_ppl", float("nan")),
            "test_ppl": (r.metrics or {}).get("test_ppl", float("nan")),
            "best_val_ppl": float(history["val_ppl"].min()) if history is not None and "val_ppl" in history
            else float("nan"),
            "steps": (r.metrics or {}).get("step", 0),
            "error": type(r.error).__name__ if r.error else "",
            "setting": json.dumps(p, sort_keys=True),
        })
    return pd.DataFrame(rows).sort_values(["val_ppl", "seed"], na_position="last").reset_index(drop=True)


def arms_frame(df):
    """One row per setting (an arm): its seeds, and mean and standard deviation over them of validation and test
    perplexity; best mean validation perplexity first (settings are selected on validation)."""
    ok = df[df["error"].fillna("") == ""]  # read back from CSV, an empty error is NaN
    g = ok.groupby("setting", sort=False)
    arms = g[["strategy", "alpha", "kd_loss", "temperature", *[k for k in LOSS_PARAMS if k in ok]]].first()
    arms["seeds"] = g["seed"].apply(lambda s: " ".join(str(x) for x in sorted(s)))
    for col in ("val_ppl", "test_ppl"):
        arms[f"{col}_mean"], arms[f"{col}_sd"] = g[col].mean().round(3), g[col].std(ddof=1).round(3)
    return arms.sort_values("val_ppl_mean").reset_index()


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
    check_teacher(d, store, [lang])
    space = load_space(s.space)
    base = to_dict(d)
    if s.max_steps:
        base["train"]["max_steps"] = s.max_steps
    check_space(space, base["alpha"], base["train"]["max_steps"])
    evals = -(-base["train"]["max_steps"] // d.train.eval_every)  # reports per trial
    wait_for_room(d.scaling, "a sweep trial", cfg.ray.wait_for_resources_s, log)
    # The trial's own CPU share comes out of its first worker's, so that trials of c CPUs each fit c CPUs
    # (two 1-CPU trials on 2 CPUs run at once; the worker still gets c torch threads).
    base["scaling"]["cpus_per_worker"] = d.scaling.cpus_per_worker - TRIAL_CPU / d.scaling.num_workers
    need = run_resources(from_dict(ScalingArgs, base["scaling"]))  # a trial's workers, CPUs and GPUs
    width = max_concurrent({**need, "CPU": need["CPU"] + TRIAL_CPU}, s.max_concurrent)
    storage = storage_path(cfg.ray, store)
    if not s.seeds:
        raise MomeError("distill.sweep.seeds is empty; give at least one seed (3 or more to judge the claims)")
    fixed = {"base": base, "lang": lang, "run": store.location, "ray": to_dict(cfg.ray),
             "test_blocks": cfg.eval.max_blocks}
    name = run_name(store, "sweep-kd", {**fixed, "space": space, "sweep": to_dict(s)}, parents)
    trainable = tune.with_resources(trial_fn, {"CPU": TRIAL_CPU})
    path = f"{storage.rstrip('/')}/{name}"
    stop = (f"ASHA on val_ppl (grace {s.grace_period} of {evals} evaluations)" if s.early_stop
            else "every trial runs every step")
    log(f"[sweep kd] expert '{lang}', {base['train']['max_steps']} steps per trial, seeds {s.seeds} for every "
        f"setting, {width} trials at a time, {stop}; {path}")
    tuner = restore_or_new(path, trainable, lambda: tune.Tuner(
        trainable,
        param_space={"params": to_tune(space), "seed": tune.grid_search(list(s.seeds)), **fixed, "sweep": name},
        tune_config=tune.TuneConfig(
            metric="val_ppl", mode="min", num_samples=s.num_samples, max_concurrent_trials=width,
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=evals + 1,
                                    grace_period=min(s.grace_period, evals)) if s.early_stop else None,
        ),
        run_config=tune.RunConfig(name=name, storage_path=storage,
                                  callbacks=tracking_callbacks(s.mlflow_uri, f"{store.name}-sweep-kd")),
    ), log)
    grid = fit_sweep(tuner)
    df = results_frame(grid)
    write_table(df.drop(columns="setting"), out_dir, "results")
    df.to_csv(out_dir / "results.csv", index=False)  # with each trial's setting (JSON): the arms' key
    if (df["error"] == "").sum() == 0:
        raise MomeError(f"every sweep trial failed; see the trial logs under {path}")
    arms = arms_frame(df)
    write_table(arms.drop(columns="setting"), out_dir, "arms")
    best = json.loads(arms["setting"].iloc[0])
    (out_dir / "best_config.yaml").write_text(yaml.safe_dump({"distill": best}, sort_keys=False))
    log(f"[sweep kd] {len(df)} trials, {len(arms)} settings x seeds {s.seeds}; best on validation: {best} "
        f"(val ppl {arms['val_ppl_mean'].iloc[0]:.2f} mean over seeds)")
    return {"trials": len(df), "failed": int((df["error"] != "").sum()), "best": best,
            "best_val_ppl": float(arms["val_ppl_mean"].iloc[0]), "lang": lang, "seeds": list(s.seeds),
            "tune_dir": path}
