"""The KD sweep on Ray Tune: search-space parsing, and a 2-trial smoke run on the session cluster."""

from pathlib import Path

import pandas as pd
import pytest
import yaml

from mome_ray import stages
from mome_ray.errors import MomeError
from mome_ray.settings import load_settings
from mome_ray.sweeps import load_space, markdown_table, to_tune
from tests.conftest import copy_teacher_run

ROOT = Path(__file__).resolve().parents[1]


def test_search_space_yaml_becomes_tune_domains(tmp_path):
    from ray.tune.search.sample import Categorical, Float

    space = load_space(ROOT / "tune_spaces/kd.yaml")
    assert len(space["alpha"]["grid"]) == 5 and space["kd_loss"]["grid"] == ["reverse_kl", "forward_kl", "jsd"]
    t = to_tune({"a": {"grid": [1, 2]}, "b": {"loguniform": [1e-4, 1e-2]}, "c": {"choice": ["x"]}, "d": 3,
                 "e": {"f": {"uniform": [0, 1]}}})
    assert t["a"] == {"grid_search": [1, 2]} and isinstance(t["b"], Float) and isinstance(t["c"], Categorical)
    assert t["d"] == 3 and isinstance(t["e"]["f"], Float)
    with pytest.raises(MomeError, match="'b': uniform needs \\[low, high\\]"):
        to_tune({"b": {"uniform": [1]}})
    with pytest.raises(MomeError, match="no search space at"):
        load_space(tmp_path / "missing.yaml")


def test_markdown_table():
    df = pd.DataFrame([{"name": "a|b", "x": 1.23456, "y": float("nan")}])
    assert markdown_table(df) == "| name | x | y |\n|---|---|---|\n| a\\|b | 1.235 |  |\n"


def test_two_trial_kd_sweep(tiny_teacher, tmp_path):
    run_dir = copy_teacher_run(tiny_teacher, tmp_path / "run")
    space = tmp_path / "kd.yaml"
    space.write_text(yaml.safe_dump({"alpha": {"grid": [{"strategy": "fixed", "alpha": 0.5},
                                                       {"strategy": "alternating"}]},
                                     "kd_loss": "forward_kl", "temperature": 2.0}))
    cfg = load_settings(str(ROOT / "configs/tiny.yaml"),
                        [f"run_dir={run_dir}", f"distill.sweep.space={space}", "distill.sweep.lang=fr",
                         "distill.sweep.max_steps=4", "distill.train.eval_every=2"])
    meta = stages.sweep_kd(cfg, log=lambda *a: None)

    out = run_dir / "sweep_kd"
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 2 and set(df["strategy"]) == {"fixed", "alternating"} and set(df["kd_loss"]) == {"forward_kl"}
    assert (df["error"].isna()).all() and (df["val_ppl"] > 1).all() and (df["test_ppl"] > 1).all()
    assert (df["seed"] == 0).all() and (df["steps"] == 4).all()  # no early stopping: every trial ran every step
    assert df["val_ppl"].is_monotonic_increasing  # best first
    best = yaml.safe_load((out / "best_config.yaml").read_text())["distill"]
    assert best["kd_loss"] == "forward_kl" and meta["metrics"]["best_val_ppl"] == pytest.approx(df["val_ppl"].iloc[0], abs=1e-3)
    assert (out / "results.md").read_text().startswith("| seed | strategy |")
    arms = pd.read_csv(out / "arms.csv")
    assert len(arms) == 2 and (arms["seeds"].astype(str) == "0").all() and arms["val_ppl_mean"].is_monotonic_increasing
    # Tune's default loggers wrote TensorBoard event files for every trial.
    events = list(Path(meta["metrics"]["tune_dir"]).rglob("events.out.tfevents*"))
    assert len(events) >= 2
    # Run again: the same sweep (same fingerprint) is restored from its storage, not started over.
    lines = []
    again = stages.sweep_kd(cfg, log=lines.append)
    assert any("restoring the interrupted sweep" in line for line in lines)
    assert again["metrics"]["tune_dir"] == meta["metrics"]["tune_dir"]
    assert again["metrics"]["best_val_ppl"] == meta["metrics"]["best_val_ppl"]


def test_unknown_space_key_is_refused(tiny_teacher, tmp_path):
    run_dir = copy_teacher_run(tiny_teacher, tmp_path / "run")
    space = tmp_path / "kd.yaml"
    space.write_text("lr: {grid: [0.1, 0.2]}\n")
    cfg = load_settings(str(ROOT / "configs/tiny.yaml"), [f"run_dir={run_dir}", f"distill.sweep.space={space}"])
    with pytest.raises(MomeError, match="unknown keys \\['lr'\\]"):
        stages.sweep_kd(cfg, log=lambda *a: None)


def test_a_space_may_set_jsd_beta_and_skew_and_the_tables_show_them():
    from types import SimpleNamespace

    from mome_ray.kd_sweep import arms_frame, check_space, results_frame

    check_space({"kd_loss": "jsd", "jsd_beta": {"grid": [0.1, 0.9]}, "skew": 0.2})
    trial = lambda seed, beta, ppl: SimpleNamespace(  # noqa: E731
        config={"seed": seed, "params": {"kd_loss": "jsd", "jsd_beta": beta}}, metrics={"val_ppl": ppl, "step": 4},
        metrics_dataframe=pd.DataFrame({"val_ppl": [ppl]}), error=None)
    df = results_frame([trial(0, 0.1, 9.0), trial(0, 0.9, 8.0), trial(1, 0.1, 9.5), trial(1, 0.9, 8.5)])
    arms = arms_frame(df)
    assert list(arms["jsd_beta"]) == [0.9, 0.1] and "skew" not in arms  # the space did not set skew
    assert "jsd_beta" not in results_frame([SimpleNamespace(config={"params": {}}, metrics={}, metrics_dataframe=None,
                                                            error=None)])
