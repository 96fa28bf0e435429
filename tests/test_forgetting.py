"""The forgetting study's regimes and tables, without Ray: what a stage's step updates, what answers a
language, parameter counts against a hand count, checkpoints, and the CSV contract on fake histories.
(The stage itself runs end to end in test_moe_stage.py, on the tiny pipeline.)"""

import numpy as np
import pandas as pd
import pytest
import torch

from mome_ray import regimes
from mome_ray.forgetting import ForgettingConfig, forgetting_table, stage_table, study_markdown
from mome_ray.grid import oracle_router
from mome_ray.models import ModelConfig
from mome_ray.errors import MomeError
from mome_ray.evaluation import DocLosses, EvalConfig
from mome_ray.training import TrainConfig, build_optimizer, build_schedule, lm_train_step

LANGS = ["en", "fr", "de", "py"]
V, C, T = 64, 32, 16
SIZE = ModelConfig(n_layer=2, n_embd=C, n_head=2, n_positions=T)


def _build(regime: str, jeet_layers: int = 1):
    torch.manual_seed(0)
    return regimes.build(regime, SIZE, jeet_layers, LANGS, V, 0, 1)


def _changed(model, before: dict) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def _snapshot(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("regime", ["jeet", "separate"])
def test_a_stage_updates_only_its_experts_stack_and_the_shared_parts(regime):
    """Stage en, then stage fr (AdamW, weight decay on): each stage changes its own stack (JEET: and the shared
    embeddings / LayerNorm / head, so en can be forgotten through them); a stack trained earlier stays
    bit-identical through later stages (no momentum or decay leaks into it)."""
    model = _build(regime)
    cfg = TrainConfig(max_steps=4, lr=0.01, warmup_frac=0.0, weight_decay=0.1)
    opt, device = build_optimizer(model, cfg), torch.device("cpu")
    sched = build_schedule(opt, cfg)
    gen = torch.Generator().manual_seed(1)
    prefix = "experts.stacks." if regime == "jeet" else "experts.models."
    for lang in ("en", "fr"):
        before = _snapshot(model)
        for _ in range(2):
            ids = torch.randint(0, V, (4, T), generator=gen)
            lm_train_step(regimes.trained(model, regime, [lang]), opt, sched, ids, cfg, device)
        changed = _changed(model, before)
        assert {k[len(prefix):].split(".")[0] for k in changed if k.startswith(prefix)} == {lang}
        shared = {k for k in changed if not k.startswith(prefix)}
        if regime == "jeet":
            assert {"experts.wte.weight", "experts.wpe.weight", "experts.ln_f.weight"} <= shared
        else:
            assert shared == set()  # nothing shared: an earlier expert cannot be touched


def test_single_model_regimes_train_the_whole_model():
    model = _build("sequential")
    assert regimes.trained(model, "sequential", ["en"]) is model
    assert regimes.trained(model, "balanced", LANGS) is model
    assert regimes.stage_langs("balanced", LANGS) == [LANGS] * 4
    assert regimes.stage_langs("jeet", LANGS) == [[l] for l in LANGS] == regimes.stage_langs("sequential", LANGS)


def test_jeet_is_evaluated_through_the_route_it_is_given():
    """A route that sends every block to the en stack gives fr blocks en's loss: the router decides, not the
    block's true language; the separate experts answer with their own expert."""
    model = _build("jeet").eval()
    blocks = {"fr": np.random.default_rng(0).integers(0, V, (3, T))}
    cpu = torch.device("cpu")
    to_en = lambda lang: oracle_router(0, len(LANGS))  # noqa: E731
    own = lambda lang: oracle_router(LANGS.index(lang), len(LANGS))  # noqa: E731
    via_en = regimes.language_losses(model, "jeet", blocks, to_en, cpu, 2, False)["fr"]
    via_fr = regimes.language_losses(model, "jeet", blocks, own, cpu, 2, False)["fr"]
    forced_en = regimes.language_losses(model, "separate", {"en": blocks["fr"]}, None, cpu, 2, False)["en"]
    assert via_en != via_fr and via_en == pytest.approx(forced_en)


def _gpt2(n_layer: int) -> int:
    """Hand count of a GPT-2 with a tied head: embeddings, n_layer blocks, final LayerNorm."""
    block = 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + 2 * C + (C * 4 * C + 4 * C) + (4 * C * C + C)
    return V * C + T * C + n_layer * block + 2 * C, block


@pytest.mark.parametrize("jeet_layers", [1, 2])
def test_parameter_counts_match_a_hand_count(jeet_layers):
    single, block = _gpt2(SIZE.n_layer)
    shared = single - SIZE.n_layer * block  # embeddings + final LayerNorm (+ the tied head)
    expected = {"sequential": (single, single), "balanced": (single, single),
                "jeet": (shared + 4 * jeet_layers * block, shared + jeet_layers * block),
                "separate": (4 * single, single)}
    for regime, counts in expected.items():
        assert regimes.param_counts(_build(regime, jeet_layers), regime) == counts, regime


@pytest.mark.parametrize("regime", regimes.REGIMES)
def test_each_regime_reloads_from_its_checkpoint_folder(regime, tmp_path):
    model = _build(regime).eval()
    build = lambda: _build("separate")  # noqa: E731 (only the separate experts need a fresh model to load into)
    io = regimes.checkpoint_io(regime, build)
    (io.get("save") or (lambda m, d: m.save_pretrained(d)))(model, tmp_path)
    loaded = regimes.load(regime, tmp_path, build).eval()
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(2))
    for lang in LANGS:
        route = lambda l: oracle_router(LANGS.index(l), len(LANGS))  # noqa: E731
        a = regimes.answerer(model, regime, lang, route)(input_ids=ids).logits
        b = regimes.answerer(loaded, regime, lang, route)(input_ids=ids).logits
        assert torch.equal(a, b)


def _fake_study():
    """Histories where sequential forgets en, and the final-model records of `final_eval`."""
    histories = {}
    for regime in regimes.REGIMES:
        hist = [{f"val_ppl/{l}": 100.0 for l in LANGS}]
        for stage in range(1, 5):
            hist.append({f"val_ppl/{l}": 50.0 + (10 * stage if regime == "sequential" and l == "en" else 0)
                         for l in LANGS})
        histories[regime] = hist
    docs = {l: DocLosses(np.array([30.0, 60.0, 90.0]), np.array([10, 20, 30])) for l in LANGS}  # loss 3.0
    final = {r: {"docs": docs, "blocks": {l: 5 for l in LANGS},
                 "routing": regimes.routing_of(r, "router"), "params_total": 4000 if r == "separate" else 1000,
                 "params_active": 1000} for r in regimes.REGIMES}
    return stage_table(histories, LANGS), final


def test_the_forgetting_table_keeps_the_csv_contract_and_flags_only_separate():
    stages, final = _fake_study()
    table = forgetting_table(stages, final, EvalConfig(bootstrap=200))
    assert list(table.columns) == ["regime", "lang", "best", "final", "forgetting", "forgetting_pct", "test_ppl",
                                   "test_ppl_lo", "test_ppl_hi", "test_blocks", "routing", "params_total",
                                   "params_active", "by_construction"]
    assert set(zip(table.regime, table.lang)) == {(r, l) for r in regimes.REGIMES for l in LANGS}
    assert set(table[table.by_construction].regime) == {"separate"}
    en = table.set_index(["regime", "lang"]).loc[("sequential", "en")]
    assert (en.best, en["final"], en.forgetting, en.forgetting_pct) == (60.0, 90.0, 30.0, 50.0)
    assert table.test_ppl.round(2).eq(round(np.exp(3.0), 2)).all()
    assert (table.test_ppl_lo <= table.test_ppl).all() and (table.test_ppl <= table.test_ppl_hi).all()
    assert dict(zip(table.regime, table.routing)) == {"sequential": "-", "balanced": "-", "jeet": "router",
                                                      "separate": "oracle"}
    md = study_markdown(stages, table, final, LANGS)
    assert "| 20.1 [" in md  # test ppl with its interval
    assert "| separate experts (forgetting impossible by construction) | one whole model per language" in md
    assert "| oracle | 4000 | 1000 | 4 |" in md  # total, active, total vs the single model


def test_round_trips_through_csv(tmp_path):
    stages, final = _fake_study()
    forgetting_table(stages, final, EvalConfig(bootstrap=100)).to_csv(tmp_path / "f.csv", index=False)
    df = pd.read_csv(tmp_path / "f.csv")
    assert df.by_construction.dtype == bool and df.params_total.dtype.kind == "i"


def test_jeet_layers_must_be_positive():
    with pytest.raises(MomeError, match="jeet_layers"):
        ForgettingConfig(jeet_layers=0)
