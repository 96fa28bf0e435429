"""Config loading: every shipped YAML, overrides, inheritance, and clear errors for bad keys/types."""

from pathlib import Path

import pytest

from mome_ray.config import from_dict
from mome_ray.errors import MomeError
from mome_ray.models import ModelConfig
from mome_ray.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name != "base.yaml")


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_loads(path):
    cfg = load_settings(str(path))
    assert isinstance(cfg, Settings)
    assert cfg.langs == ["en", "fr", "de", "py"]
    assert {s.lang for s in cfg.corpus.sources} >= set(cfg.langs)  # inherited from base.yaml
    assert all(s.licence for s in cfg.corpus.sources), "every source records its licence for the manifest"
    assert cfg.teacher.train.batch_size % len(cfg.langs) == 0
    assert path.read_text().startswith("#"), "each preset opens with a comment giving its command"


def test_presets_grow_in_size():
    tiny, small, paper = (load_settings(str(ROOT / f"configs/{n}.yaml")) for n in ("tiny", "small", "paper"))
    sizes = [c.teacher.model.n_layer * c.teacher.model.n_embd for c in (tiny, small, paper)]
    assert sizes == sorted(sizes) and paper.teacher.model.n_layer == 24 and paper.teacher.model.n_embd == 1024
    assert paper.tokenizer.vocab_size == 32000 and paper.teacher.model.n_positions == 1024


def test_overrides_nested_values_and_lists():
    cfg = load_settings(str(ROOT / "configs/tiny.yaml"),
                        ["teacher.train.max_steps=7", "langs=[en,py]", "teacher.train.lr=1e-4", "run_dir=/x"])
    assert cfg.teacher.train.max_steps == 7 and cfg.langs == ["en", "py"] and cfg.run_dir == "/x"
    assert cfg.teacher.train.lr == pytest.approx(1e-4)


def test_a_partial_section_keeps_its_own_defaults_not_its_class_defaults():
    """serve.router's default (0.25 CPU, batches of 32) is built by a factory: overriding one of its keys keeps the
    others, rather than falling back to DeploymentArgs' defaults (batches of 8)."""
    cfg = load_settings(None, ["serve.router.num_cpus=1", "serve.moe.max_ongoing_requests=8"])
    assert (cfg.serve.router.num_cpus, cfg.serve.router.max_batch_size) == (1, 32)
    assert (cfg.serve.moe.num_cpus, cfg.serve.moe.max_ongoing_requests) == (0.5, 8)


def test_unknown_key_is_named():
    with pytest.raises(MomeError, match=r"unknown config key 'teacher\.train\.max_stpes'"):
        load_settings(str(ROOT / "configs/tiny.yaml"), ["teacher.train.max_stpes=3"])


def test_wrong_type_is_named():
    with pytest.raises(MomeError, match=r"'teacher\.model\.n_layer' must be int"):
        load_settings(None, ["teacher.model.n_layer=two"])


def test_cross_field_check():
    with pytest.raises(MomeError, match="divisible by n_head"):
        from_dict(ModelConfig, {"n_embd": 30, "n_head": 4})


def test_inherit_merges_and_detects_cycles(tmp_path):
    (tmp_path / "a.yaml").write_text("inherit: b.yaml\nseed: 3\nteacher: {train: {lr: 0.5}}\n")
    (tmp_path / "b.yaml").write_text("seed: 1\nteacher: {train: {max_steps: 9}}\n")
    cfg = load_settings(str(tmp_path / "a.yaml"))
    assert cfg.seed == 3 and cfg.teacher.train.max_steps == 9 and cfg.teacher.train.lr == 0.5
    (tmp_path / "b.yaml").write_text("inherit: a.yaml\n")
    with pytest.raises(MomeError, match="inherits itself"):
        load_settings(str(tmp_path / "a.yaml"))


def test_missing_file_and_bad_override():
    with pytest.raises(MomeError, match="not found"):
        load_settings("configs/nope.yaml")
    with pytest.raises(MomeError, match="key.path=value"):
        load_settings(None, ["justakey"])
