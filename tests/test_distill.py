"""Distillation: the KD step, the plan of students, and a tiny two-language parallel run on Ray Train."""

import re
import time
from pathlib import Path

import pytest
import torch

from mome_ray import stages
from mome_ray.alpha import AlphaConfig
from mome_ray.artifacts import read_meta
from mome_ray.config import from_dict
from mome_ray.distill import DistillConfig, Student, plan, student_config
from mome_ray.kd import OnlineTeacher, kd_step
from mome_ray.errors import MomeError
from mome_ray.losses import jsd, reverse_kl, skew_kl
from mome_ray.moe_train import MoEConfig
from mome_ray.models import ModelConfig, build_gpt2, load_lm
from mome_ray.settings import load_settings
from mome_ray.training import TrainConfig, build_optimizer, build_schedule, lm_train_step
from tests.conftest import copy_teacher_run

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(log=lambda *a: None)


def _student(seed=0):
    torch.manual_seed(seed)
    return build_gpt2(ModelConfig(n_layer=1, n_embd=32, n_head=2, n_positions=16), 64, 0, 1)


def _opt(model, cfg):
    opt = build_optimizer(model, cfg)
    return opt, build_schedule(opt, cfg)


def test_alpha_one_is_exactly_plain_ce_training():
    cfg = TrainConfig(max_steps=3, lr=0.01)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    teacher = OnlineTeacher(_student(seed=7).eval())
    a, b = _student(), _student()
    opt_a, sched_a = _opt(a, cfg)
    opt_b, sched_b = _opt(b, cfg)
    cpu = torch.device("cpu")
    for _ in range(3):
        ce_loss = lm_train_step(a, opt_a, sched_a, ids, cfg, cpu)
        ce, kd = kd_step(b, teacher, opt_b, sched_b, ids, None, 1.0, 0.0, "reverse_kl", 1.0, cfg, cpu)
        assert ce == ce_loss and kd > 0  # KD is still measured (for the log), but not trained on
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_kd_term_moves_the_student_towards_the_teacher():
    cfg = TrainConfig(max_steps=30, lr=0.01, warmup_frac=0.0)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    teacher, student = OnlineTeacher(_student(seed=7).eval()), _student()
    opt, sched = _opt(student, cfg)
    kds = [kd_step(student, teacher, opt, sched, ids, None, 0.0, 1.0, "reverse_kl", 1.0, cfg,
                   torch.device("cpu"))[1]
           for _ in range(30)]
    assert kds[-1] < 0.5 * kds[0]


def test_plan_and_config_errors():
    cfg = DistillConfig(langs=["fr"])
    assert [s.name for s in plan(cfg, ["en", "fr"])] == ["fr", "multilingual", "nokd-fr"]
    assert [s.kd for s in plan(cfg, ["en", "fr"])] == [True, True, False]
    with pytest.raises(MomeError, match="not languages of this run"):
        plan(DistillConfig(langs=["es"]), ["en", "fr"])
    with pytest.raises(MomeError, match="kd_loss 'kl' is not one of"):
        from_dict(DistillConfig, {"kd_loss": "kl"})
    with pytest.raises(MomeError, match="alpha.alpha must be in"):
        from_dict(DistillConfig, {"alpha": {"alpha": 1.5}})
    assert AlphaConfig().strategy == "fixed"


@pytest.mark.parametrize("key, bad, interval", [("jsd_beta", 0.0, "(0, 1)"), ("jsd_beta", 1.0, "(0, 1)"),
                                                ("skew", 1.0, "[0, 1)"), ("skew", -0.1, "[0, 1)")])
def test_kd_recipe_refuses_jsd_beta_and_skew_out_of_range(key, bad, interval):
    for cls, section in ((DistillConfig, "distill"), (MoEConfig, "moe")):
        with pytest.raises(MomeError, match=f"{section}.{key} must be in {re.escape(interval)}.*got {bad}"):
            from_dict(cls, {key: bad})
    assert DistillConfig(skew=0.0).skew == 0.0  # λ = 0 is plain forward KL


def test_kd_fn_is_the_configured_divergence_with_its_parameters():
    s, t = (torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(i)) for i in range(2))
    fn = DistillConfig(kd_loss="jsd", jsd_beta=0.2).kd_fn()
    assert fn(s, t).item() == pytest.approx(jsd(s, t, beta=0.2).item())
    assert fn(s, t).item() != pytest.approx(jsd(s, t).item())  # not the default β = 0.5
    fn = DistillConfig(kd_loss="skew_kl", skew=0.4).kd_fn()
    assert fn(s, t, temperature=2.0).item() == pytest.approx(skew_kl(s, t, temperature=2.0, skew=0.4).item())
    assert DistillConfig().kd_fn()(s, t).item() == pytest.approx(reverse_kl(s, t).item())
    # what a student depends on: the parameter of its own loss only; a CE-only student none of them
    jsd_cfg = DistillConfig(kd_loss="jsd", jsd_beta=0.2)
    kd = student_config(jsd_cfg, Student("fr", ["fr"], True), ["fr"], 0)["distill"]
    assert kd["jsd_beta"] == 0.2 and "skew" not in kd
    ce = student_config(jsd_cfg, Student("nokd-fr", ["fr"], False), ["fr"], 0)["distill"]
    assert not {"jsd_beta", "skew", "kd_loss", "alpha", "temperature"} & set(ce)


def test_two_experts_distil_in_parallel_with_baselines(tiny_teacher, tmp_path, capfd):
    run_dir = copy_teacher_run(tiny_teacher, tmp_path / "run")
    cfg = load_settings(str(ROOT / "configs/tiny.yaml"),
                        [f"run_dir={run_dir}", "distill.langs=[en, fr]", "distill.alpha.strategy=adaptive",
                         "distill.alpha.min_window=3"])
    lines = []
    meta = stages.experts(cfg, log=lines.append)

    # Two runs at a time on the 2-CPU test cluster, the rest queued; every student exported as a model.
    assert "[launcher] 5 runs, 2 at a time on this cluster" in lines
    assert any("running: " in l and "queued: " in l for l in lines)
    for name in ("en", "fr", "nokd-en", "nokd-fr", "multilingual"):
        m = read_meta(run_dir / "experts", name)
        assert load_lm(run_dir / "experts" / name, run_dir / "tokenizer").config.n_layer == 1
        trace = m["metrics"]["trace"]
        assert trace["step"] == list(range(1, 11))
        assert m["metrics"]["final"]["val_loss"] < m["metrics"]["untrained"]["val_loss"]
        if name.startswith("nokd"):
            assert set(trace["alpha"]) == {1.0} and set(trace["kd"]) == {None}
        else:  # KD measured every step; adaptive alpha starts at 0.5 and then moves (window of 3 steps)
            assert all(k is not None and k > 0 for k in trace["kd"])
            assert trace["alpha"][0] == 0.5 and [a + b for a, b in zip(trace["alpha"], trace["beta"])] == [1.0] * 10
    assert set(read_meta(run_dir / "experts", "multilingual")["metrics"]["final"]) >= {"val_ppl/en", "val_ppl/fr",
                                                                                       "val_ppl/de", "val_ppl/py"}
    # Per-expert progress lines came from the workers. Ray forwards a worker's lines to the driver a little
    # later, so wait for them (bounded) rather than expect them by the time the stage returns.
    seen, deadline = "", time.time() + 30
    while "[fr] step 5/10" not in seen and time.time() < deadline:
        seen += "".join(capfd.readouterr())
        time.sleep(0.5)
    assert "[fr] step 5/10" in seen

    # One table: teacher, experts, no-KD students, multilingual student, on the same test blocks.
    table = (run_dir / "experts" / "eval.md").read_text()
    assert [r["model"].split(" ")[0] for r in meta["metrics"]["eval"]] == ["teacher", "experts", "no-KD",
                                                                           "multilingual"]
    assert "| teacher |" in table and (run_dir / "experts" / "eval.csv").is_file()
    experts_row = meta["metrics"]["eval"][1]
    assert experts_row["ppl/en"] > 1 and experts_row.get("ppl/de", float("nan")) != experts_row.get("ppl/de")  # no de expert
    assert experts_row["ppl_lo/en"] <= experts_row["ppl/en"] <= experts_row["ppl_hi/en"]

    # Same command again: every student is up to date and skipped.
    again = []
    stages.experts(cfg, log=again.append)
    assert sum("up to date" in l for l in again) == 5


def test_student_longer_than_teacher_context_is_refused(tiny_teacher, tmp_path):
    run_dir = copy_teacher_run(tiny_teacher, tmp_path / "run")
    cfg = load_settings(str(ROOT / "configs/tiny.yaml"), [f"run_dir={run_dir}", "distill.model.n_positions=512"])
    with pytest.raises(MomeError, match="exceeds the teacher's context"):
        stages.experts(cfg, **QUIET)
