"""Router stage, CLI and Ray Tune sweep on the tiny preset (in-test corpus)."""

import pandas as pd
import pytest

from mome_ray.artifacts import is_complete, read_meta
from mome_ray.cli import main
from mome_ray.router import load_router
from mome_ray.settings import load_settings
from mome_ray.stages import stage_config
from tests.conftest import ROOT, copy_run, tiny_overrides

TINY = str(ROOT / "configs/tiny.yaml")


def test_router_command_trains_evaluates_and_saves(tiny_tokenized, corpus_dir, tmp_path, capsys):
    run_dir = copy_run(tiny_tokenized.run_dir, tmp_path / "run")
    overrides = tiny_overrides(run_dir, corpus_dir)
    assert main(["router", "--config", TINY, *overrides]) == 0
    out = capsys.readouterr().out
    assert "test sequences: weighted F1" in out and "accuracy by window length" in out and "source shift" in out
    for name in ("router.skops", "router.json", "confusion.png", "meta.json", "tokenizer/tokenizer.json"):
        assert (run_dir / "router" / name).is_file(), name
    m = read_meta(run_dir, "router")["metrics"]
    assert set(m["accuracy_by_length"]) == {"8", "16", "32", "64", "whole", "sequences"}
    assert m["test_f1_weighted"] >= 0.95 and m["accuracy_by_length"]["whole"] >= 0.95
    assert m["unknown_on_not_text"] == 1.0 and m["throughput_seq_per_s"] > 0
    assert set(m["mixed_accuracy"]) == {"en_prose_with_py", "py_with_en_docstring"}
    shift = m["shift_accuracy"]  # tiny fetches nothing: the third-party Python tables only
    assert set(shift["by_source"]) == {"py-tables"} and set(shift["by_length"]) == {"8", "16", "32", "64", "whole"}
    assert 0 <= shift["overall"] <= 1 and shift["n"] == sum(shift["n_by_source"].values()) > 0
    router = load_router(run_dir / "router")
    assert router.predict(["def f(x):\n    return x + 1\n", "Bonjour, la rivière traverse la vieille ville", ""]) \
        == ["py", "fr", "unknown"]
    cfg = load_settings(TINY, overrides)
    assert is_complete(run_dir, "router", stage_config(cfg, "router"))  # the pipeline skips it next time


def test_sweep_router_two_trials(ray_head, tiny_tokenized, corpus_dir, tmp_path):
    run_dir = copy_run(tiny_tokenized.run_dir, tmp_path / "run")
    space = tmp_path / "space.yaml"
    space.write_text("features: token_tfidf\nclassifier: {grid: [logreg, multinomial_nb]}\n"
                     "classifier_params: {logreg: {C: {loguniform: [1, 10]}}}\n")
    overrides = tiny_overrides(run_dir, corpus_dir, f"router.sweep.space={space}", "router.examples_per_lang=120",
                               "router.eval_per_lang=30", "router.sweep.cpus_per_trial=0.5")
    assert main(["sweep", "router", "--config", TINY, *overrides]) == 0
    table = pd.read_csv(run_dir / "router" / "sweep_results.csv")
    assert sorted(table["classifier"]) == ["logreg", "multinomial_nb"]
    for col in ("val_accuracy", "val_f1_weighted", "val_precision_macro", "val_recall_macro", "val_f1_py",
                "fit_s", "seq_per_s", "model_kb"):
        assert table[col].notna().all() and (table[col] > 0).all(), col
    assert table["val_accuracy"].is_monotonic_decreasing
    assert (run_dir / "router" / "sweep_results.md").read_text().startswith("| features | classifier |")
    meta = read_meta(run_dir, "router")
    assert meta["metrics"]["sweep"]["best"]["classifier"] == table["classifier"][0] == meta["metrics"]["classifier"]
    assert (run_dir / "router" / "confusion.png").is_file()
    assert load_router(run_dir / "router").predict(["def f(x):\n    return x\n"]) == ["py"]


def test_sweep_needs_an_action(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sweep"])
    assert e.value.code == 2 and "required: SWEEP" in capsys.readouterr().err


def test_router_needs_the_tokenizer_stage(tmp_path, capsys):
    assert main(["router", "--config", TINY, f"run_dir={tmp_path}"]) == 2
    assert "mome corpus build" in capsys.readouterr().err
