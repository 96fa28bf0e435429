"""The moe stage, the forgetting study, the report and add-expert on the tiny preset.

One `run_pipeline` on a copy of the tiny teacher's run dir (corpus, tokenizer and teacher up to date, so
it trains experts -> moe -> forgetting and writes the report) is shared by the stage tests.
"""

import hashlib
import random
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from mome_ray import stages
from mome_ray.add_expert import add_expert
from mome_ray.artifacts import read_meta
from mome_ray.kd import OnlineTeacher, kd_step
from mome_ray.evaluation import EvalConfig, Row, perplexity_table
from mome_ray.jeet import COMMON, JEETConfig, JEETModel
from mome_ray.models import ModelConfig, build_gpt2
from mome_ray.moe import MoE, Routing
from mome_ray.moe import Routed
from mome_ray.regimes import REGIMES
from mome_ray.settings import load_settings
from mome_ray.training import TrainConfig, build_optimizer, build_schedule
from tests.conftest import copy_teacher_run, tiny_overrides

pytestmark = pytest.mark.timeout(1500)  # the shared tiny pipeline (experts, KD sweep, moe, forgetting) runs in the first test
ROOT = Path(__file__).resolve().parents[1]
LANGS = ["en", "fr", "de", "py"]
SPANISH = ["El río atraviesa la ciudad vieja y el mercado está en la orilla izquierda",
           "Ella dijo que el tren a la costa llegaba tarde otra vez esta mañana",
           "No es fácil cuidar un jardín cuando el verano es tan seco",
           "Han construido un puente nuevo sobre el río para la gente del valle",
           "Los niños jugaban en el parque cuando empezó a llover",
           "Hay una pequeña tienda al final de la calle que vende pan",
           "Este libro trata de la historia de los barcos que salían del norte",
           "Todas las luces de la casa estaban encendidas cuando volvimos"]


@pytest.mark.parametrize("common", [False, True])
def test_jeet_kd_step_changes_only_the_selected_stack_and_shared_parts(common):
    torch.manual_seed(0)
    size = ModelConfig(n_layer=1, n_embd=32, n_head=2, n_positions=16)
    moe = MoE(JEETModel(JEETConfig(LANGS, 64, 0, 1, size, common=common)))
    teacher = OnlineTeacher(build_gpt2(size, 64, 0, 1).eval())
    cfg = TrainConfig(max_steps=2, lr=0.01, warmup_frac=0.0)
    opt = build_optimizer(moe, cfg)
    sched = build_schedule(opt, cfg)
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    routed = Routed(moe, routing=Routing.onehot(torch.tensor([1, 1, 3, 3]), len(LANGS)))  # fr and py only
    ce, kd = kd_step(routed, teacher, opt, sched, ids, None, 0.5, 0.5, "reverse_kl", 1.0, cfg,
                     torch.device("cpu"))
    assert ce > 0 and kd > 0
    changed = {k for k, v in moe.state_dict().items() if not torch.equal(v, before[k])}
    stacks = {k.split(".")[2] for k in changed if k.startswith("experts.stacks.")}
    assert stacks == {"fr", "py"} | ({COMMON} if common else set())
    assert {"experts.wte.weight", "experts.wpe.weight", "experts.ln_f.weight"} <= changed


@pytest.fixture(scope="module")
def tiny_run(tiny_teacher, corpus_dir, tmp_path_factory):
    run_dir = copy_teacher_run(tiny_teacher, tmp_path_factory.mktemp("pipeline"))
    cfg = load_settings(str(ROOT / "configs/tiny.yaml"), tiny_overrides(run_dir, corpus_dir))
    lines = []
    stages.run_pipeline(cfg, log=lines.append)
    return cfg, lines


def test_moe_stage_writes_the_whole_grid(tiny_run):
    cfg, lines = tiny_run
    run_dir = Path(cfg.run_dir)
    assert "== moe" in lines and "== forgetting" in lines and any("up to date" in l for l in lines)
    for name in ("jeet", "moe-ce"):
        m = read_meta(run_dir / "moe", name)
        assert m["metrics"]["trace"]["step"] == list(range(1, 11))
        assert m["metrics"]["final"]["val_loss"] < m["metrics"]["untrained"]["val_loss"]
        assert JEETModel.load(run_dir / "moe" / name).has_common == (name == "moe-ce")
    meta = read_meta(run_dir, "moe")
    assert meta["metrics"]["routing"] == "router"  # the pipeline trained the router before the MoE
    grid = pd.read_csv(run_dir / "moe" / "grid.csv")
    rows = set(zip(grid.model, grid.row))
    per_moe = {"router top-1", "uniform average (distribution mean)", "router top-2 mix"} | {
        f"expert {l} forced" for l in LANGS}
    shared_head = per_moe | {"uniform average (hidden mean)"}  # JEET and MoE-CE can average hidden states
    expected = {("teacher", "-"), ("multilingual student", "-"), ("no-KD students", "-")}
    expected |= {("PLE", r) for r in per_moe} | {(m, r) for m in ("JEET", "MoE-CE") for r in shared_head}
    expected |= {("MoE-CE", f"{r} + common") for r in shared_head} | {("MoE-CE", "common alone")}
    pairs = {"PLE": "(distribution mean)", "JEET": "(hidden mean)", "MoE-CE": "(hidden mean) + common"}
    expected |= {(m, f"expert {l} + py {how}") for m, how in pairs.items() for l in ("en", "fr", "de")}
    assert rows == expected
    ppl = grid[[f"ppl/{l}" for l in LANGS]].to_numpy()
    assert (ppl > 1).all() and (grid.active_params <= grid.total_params).all() and (grid.eval_s >= 0).all()
    # The tiny router routes every test block of this in-test text to its language, so PLE with the
    # router is each language's KD expert (the experts table), and a forced expert answers as routed.
    experts = pd.read_csv(run_dir / "experts" / "eval.csv").iloc[1]
    ple = grid[(grid.model == "PLE") & (grid.row == "router top-1")].iloc[0]
    assert [ple[f"ppl/{l}"] for l in LANGS] == pytest.approx([experts[f"ppl/{l}"] for l in LANGS], abs=0.011)
    jeet = grid[grid.model == "JEET"].set_index("row")
    assert jeet.loc["expert fr forced", "ppl/fr"] == jeet.loc["router top-1", "ppl/fr"]
    assert "| PLE | router top-1 |" in (run_dir / "moe" / "grid.md").read_text()


def test_forgetting_tables_and_plots(tiny_run):
    cfg, _ = tiny_run
    run_dir = Path(cfg.run_dir)
    out = run_dir / "forgetting"
    table = pd.read_csv(out / "forgetting.csv")
    assert list(table.columns) == ["regime", "lang", "best", "final", "forgetting", "forgetting_pct", "test_ppl",
                                   "test_ppl_lo", "test_ppl_hi", "test_blocks", "routing", "params_total",
                                   "params_active", "by_construction"]
    assert set(zip(table.regime, table.lang)) == {(r, l) for r in REGIMES for l in LANGS}
    assert (table.forgetting >= 0).all() and (table.final >= table.best).all()
    assert (table.test_ppl > 1).all() and (table.test_blocks > 0).all()
    assert set(table[table.by_construction].regime) == {"separate"}
    assert (table[table.regime == "separate"].forgetting == 0).all()  # by construction
    # JEET through the router the pipeline trained; its stacks share embeddings + head, one block each
    regime = table.drop_duplicates("regime").set_index("regime")
    assert regime.routing.to_dict() == {"sequential": "-", "balanced": "-", "jeet": "router", "separate": "oracle"}
    single = regime.loc["sequential", "params_total"]
    assert regime.loc["balanced", "params_total"] == single == regime.loc["separate", "params_active"]
    assert regime.loc["separate", "params_total"] == 4 * single
    C = cfg.forgetting.model.n_embd
    assert regime.loc["jeet", "params_active"] == single  # one 1-block stack + the shared parts: the single model
    assert regime.loc["jeet", "params_total"] == single + 3 * (12 * C * C + 13 * C)  # + three more GPT-2 blocks
    meta = read_meta(run_dir, "forgetting")
    assert meta["metrics"]["steps_per_stage"] == 2 and set(meta["parents"]) == {"tokenizer", "router"}
    assert meta["metrics"]["regimes"]["jeet"]["params_total"] == regime.loc["jeet", "params_total"]
    assert set(read_meta(out, "jeet")["parents"]) == {"tokenizer", "router"}
    assert set(read_meta(out, "sequential")["parents"]) == {"tokenizer"}  # a new router does not re-train it
    steps = pd.read_csv(out / "stages.csv")
    assert sorted(set(steps.stage)) == [0, 1, 2, 3, 4] and len(steps) == 5 * 4 * 4
    assert "separate experts (forgetting impossible by construction)" in (out / "forgetting.md").read_text()
    for png in ("heatmap.png", "lines.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_pipeline_report_has_every_section(tiny_run):
    cfg, lines = tiny_run
    run_dir = Path(cfg.run_dir)
    report = (run_dir / "report.md").read_text()
    assert lines[-1] == f"report: {(run_dir / 'report.md').resolve()}"
    for title in ("Corpus", "Teacher", "Knowledge distillation", "Experts vs teacher", "KD sweep", "Router",
                  "MoE evaluation grid", "Forgetting", "The paper's claims", "Deviations from the paper"):
        assert f"## {title}\n" in report
    assert "| JEET / MoE-CE position embedding | one per expert | shared by every expert |" in report  # tiny's config
    assert "not run (" not in report  # every section has its stage: the pipeline ran them all
    for png in ("teacher", "kd_losses", "kd_weights", "experts_vs_teacher", "moe_grid"):
        assert (run_dir / "plots" / f"{png}.png").is_file() and f"plots/{png}.png" in report
    assert "forgetting/heatmap.png" in report
    assert "- source shift (sources never trained on" in report  # beside the in-domain router numbers
    claims = [l for l in report.splitlines() if l.startswith("| ") and l[2].isdigit()]
    assert len(claims) == 5
    assert "JEET / PLE" in claims[3] and "sequential" in claims[4]
    assert all("not measured: fewer than 3 paired seeds" in c for c in claims[:2])  # tiny sweeps one seed
    assert all(any(f"**{v}**" in c for v in ("supported", "not supported", "mixed")) for c in claims[3:])
    # Everything is up to date now: a second pipeline run trains nothing and rewrites the report.
    again = []
    stages.run_pipeline(cfg, log=again.append)
    assert sum("up to date" in l for l in again) == len(stages.STAGES)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_add_expert_keeps_existing_experts_bit_identical(tiny_run, tmp_path):
    cfg, _ = tiny_run
    run_dir = tmp_path / "run"
    shutil.copytree(cfg.run_dir, run_dir, ignore=shutil.ignore_patterns("ray_results", "forgetting"))
    cfg = load_settings(str(ROOT / "configs/tiny.yaml"), [f"run_dir={run_dir}"])
    rng = random.Random(0)
    (tmp_path / "es").mkdir()
    (tmp_path / "es" / "docs.txt").write_text("\n\n".join(
        "\n".join(", ".join(rng.sample(SPANISH, 2)) + f" ({d}.{i})." for i in range(6)) for d in range(60)))

    def ppl():
        rows = [Row(l, {l: run_dir / "experts" / l}) for l in LANGS]
        return perplexity_table(rows, run_dir / "tokenizer", LANGS, 64, EvalConfig(max_blocks=4))[0]

    hashes, before = {l: _digest(run_dir / "experts" / l) for l in LANGS}, ppl()
    meta = add_expert(cfg, "es", tmp_path / "es", log=lambda *a: None)
    assert {l: _digest(run_dir / "experts" / l) for l in LANGS} == hashes
    pd.testing.assert_frame_equal(ppl(), before)
    assert read_meta(run_dir / "experts", "es")["config"]["student"]["langs"] == ["es"]
    grid = pd.read_csv(run_dir / "moe_plus_es" / "grid.csv")
    assert meta["metrics"]["routing"] == "router" and "expert es forced" in set(grid.row)
    ple = grid[grid.row == "router top-1"].iloc[0]
    assert 1 < ple["ppl/es"] < ple["ppl/en"] * 100
    with pytest.raises(Exception, match="already a language of this run"):
        add_expert(cfg, "fr", tmp_path / "es")
