"""50 synthetic languages through the tiny pipeline: corpus, tokenizer, teacher on Ray Train, the distillation
plan, the router, and JEET / MoE-CE trained on Ray Train and evaluated through the router.

Every language is configuration only (`mome_ray.corpus.synthetic`: a user_dir folder + corpus.stopwords),
and the batch size (8) is not a multiple of the number of languages. Runs on the session Ray head (~60 s).
"""

from pathlib import Path

import pytest
import torch

from mome_ray.storage import RunStore
from mome_ray import stages
from mome_ray.corpus.synthetic import lang_codes, write_languages
from mome_ray.data import eval_blocks, load_blocks
from mome_ray.distill import plan
from mome_ray.grid import route_for
from mome_ray.jeet import COMMON, JEETModel
from mome_ray.moe import MoE
from mome_ray.moe import Routed
from mome_ray.moe_train import train_moes
from mome_ray.settings import load_settings
from mome_ray.training import evaluate

ROOT = Path(__file__).resolve().parents[1]
N = 50

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def many(ray_head, tmp_path_factory):
    """Corpus, tokenizer, teacher (6 steps), its logit cache, router and JEET + MoE-CE (4 steps) of 50 languages."""
    root = tmp_path_factory.mktemp("many_langs")
    overrides = write_languages(root / "text", N)
    cfg = load_settings(str(ROOT / "configs/tiny.yaml"), [
        f"run_dir={root / 'run'}", *overrides, "teacher.train.max_steps=6", "teacher.train.eval_every=3",
        "moe.train.max_steps=4", "moe.train.eval_every=4", "router.examples_per_lang=100",
        "router.eval_per_lang=20", "router.eval_lengths=[16,64]"])
    quiet = lambda *a: None  # noqa: E731
    for stage in (stages.corpus, stages.tokenizer, stages.teacher, stages.teacher_logits, stages.router):
        stage(cfg, log=quiet)
    moes = train_moes(cfg.moe, cfg.langs, RunStore(cfg.run_dir), cfg.ray,
                      stages.parents_of(RunStore(cfg.run_dir), "experts"), cfg.seed, log=quiet)
    return cfg, moes


def test_fifty_languages_are_configuration_and_batches_need_not_split_evenly(many):
    cfg, _ = many
    assert cfg.langs == lang_codes(N) and len(cfg.corpus.stopwords) == N
    assert cfg.teacher.train.batch_size % N and cfg.moe.train.batch_size % N
    manifest = stages.read_meta(Path(cfg.run_dir), "corpus")
    assert set(manifest["metrics"]["max_over_min"]) == {"train", "val", "test"}


def test_teacher_learns_every_language(many):
    cfg, _ = many
    m = stages.read_meta(Path(cfg.run_dir), "teacher")["metrics"]
    assert [h["step"] for h in m["history"]] == [0, 3, 6]
    for lang in cfg.langs:
        assert m["final"][f"val_loss/{lang}"] < m["untrained"][f"val_loss/{lang}"]


def test_distillation_plan_covers_fifty_languages(many):
    cfg, _ = many
    students = plan(cfg.distill, cfg.langs)
    assert [s.name for s in students if s.kd and len(s.langs) == 1] == cfg.langs
    assert next(s for s in students if s.name == "multilingual").langs == cfg.langs
    cfg.distill.langs = ["x07", "x42"]
    assert [s.name for s in plan(cfg.distill, cfg.langs) if s.kd and len(s.langs) == 1] == ["x07", "x42"]


def test_moe_has_fifty_stacks_and_the_router_sends_every_language_to_its_own(many):
    cfg, moes = many
    run_dir, tok_dir = Path(cfg.run_dir), Path(cfg.run_dir) / "tokenizer"
    for name, common in (("jeet", False), ("moe-ce", True)):
        m = moes[name]["metrics"]
        assert m["final"]["val_loss"] < m["untrained"]["val_loss"]
        assert all(f"val_loss/{lang}" in m["final"] for lang in cfg.langs)
        assert list(JEETModel.load(run_dir / "moe" / name).stacks) == cfg.langs + ([COMMON] if common else [])

    # Through the trained router, every language's validation loss is the one its own stack got in training.
    routing, route = route_for(run_dir, cfg.langs, tok_dir)
    assert routing == "router"
    moe = MoE(JEETModel.load(run_dir / "moe" / "jeet")).eval()
    T, k = cfg.moe.model.n_positions, cfg.moe.train.eval_blocks  # the blocks training evaluated on
    val = {l: eval_blocks(load_blocks(tok_dir, "val", l, T), k) for l in cfg.langs}
    picked = {l: route(l)(torch.from_numpy(b.astype("int64")), None).index.tolist() for l, b in val.items()}
    assert picked == {l: [i] * len(val[l]) for i, l in enumerate(cfg.langs)}
    routed = {l: evaluate(Routed(moe, route(l)), {l: b}, torch.device("cpu"), 8, False)[l] for l, b in val.items()}
    trained = moes["jeet"]["metrics"]["final"]
    assert routed == pytest.approx({l: trained[f"val_loss/{l}"] for l in cfg.langs}, abs=1e-4)
