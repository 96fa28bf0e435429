"""The deviations table (paper and its code vs this config) and the report section that shows it."""

import json
from pathlib import Path

import pytest

from mome_ray.deviations import FIXED, deviations_markdown, deviations_table
from mome_ray.report import _write_report
from mome_ray.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]


def _table(preset: str, *overrides: str) -> dict:
    rows = deviations_table(load_settings(str(ROOT / "configs" / f"{preset}.yaml"), list(overrides)))
    assert len({r.aspect for r in rows}) == len(rows) and all(all(r) for r in rows)  # unique aspects, no empty cell
    return {r.aspect: r for r in rows}


def test_every_aspect_is_listed():
    rows = _table("small")
    for aspect in ("teacher size", "single-language students", "MoE expert stacks", "data", "tokenizer", "KD loss",
                   "KD temperature", "α strategy", "JEET / MoE-CE position embedding", "JEET / MoE-CE final LayerNorm",
                   "JEET / MoE-CE LM head", "average of all experts", "language + Python pair rows", "router",
                   "evaluation split", "evaluation intervals"):
        assert aspect in rows, aspect
    assert len([r for r in rows.values() if r.how.startswith(FIXED)]) >= 4  # the public code's bugs we avoid
    assert "inverse KL" in rows["KD loss"].paper and "reverse KL" in rows["KD loss"].ours


@pytest.mark.parametrize("key, aspect", [("expert_wpe", "JEET / MoE-CE position embedding"),
                                         ("expert_ln_f", "JEET / MoE-CE final LayerNorm"),
                                         ("untied_head", "JEET / MoE-CE LM head")])
def test_the_ours_column_follows_the_config(key, aspect):
    shared, own = _table("small")[aspect], _table("small", f"moe.parts.{key}=true")[aspect]
    assert own.ours != shared.ours and "as the paper's code" in own.ours and own.paper == shared.paper
    assert own.how == f"moe.parts.{key}"


def test_paper_preset_matches_the_papers_alpha_and_jeet_parts():
    paper, small = _table("paper"), _table("small")
    assert "adaptive" in paper["α strategy"].ours and "adaptive" not in small["α strategy"].ours
    assert "24 layers × 1024, 16 heads" in paper["teacher size"].ours
    assert "32,000 tokens" in paper["tokenizer"].ours
    assert all("as the paper's code" in paper[a].ours for a in ("JEET / MoE-CE position embedding",
                                                             "JEET / MoE-CE final LayerNorm", "JEET / MoE-CE LM head"))
    assert "JSD, β = 0.3" in _table("small", "distill.kd_loss=jsd", "distill.jsd_beta=0.3")["KD loss"].ours
    assert "en, fr, de each with py" in small["language + Python pair rows"].ours
    assert _table("small", "langs=[en,fr]")["language + Python pair rows"].ours.startswith("none")


def test_markdown_escapes_pipes():
    rows = deviations_table(load_settings(str(ROOT / "configs/small.yaml")))
    md = deviations_markdown(rows)
    assert md.count("\n") == len(rows) + 2 and md.startswith("| aspect | paper / its public code |")


def test_report_has_the_deviations_section_for_the_runs_config(tmp_path):
    (tmp_path / "moe").mkdir()
    config = {"langs": ["en", "fr", "de", "py"], "seed": 0, "moe": {"parts": {"expert_wpe": True}},
              "eval": {"max_blocks": 8}}
    (tmp_path / "moe" / "meta.json").write_text(json.dumps({"stage": "moe", "config": config, "metrics": {}}))
    report = _write_report(tmp_path, "t").read_text()
    section = report.split("## Deviations from the paper\n")[1]
    assert "| JEET / MoE-CE position embedding | one per expert | one per expert (as the paper's code) |" in section
    assert "| JEET / MoE-CE final LayerNorm | one per expert | shared by every expert |" in section
    assert "8 evenly spaced blocks per language" in section
