"""MoE invariants on tiny models (2 layers x 32 wide, vocab 64): no Ray, no files but tmp_path."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from mome_ray.errors import MomeError
from mome_ray.grid import moe_rows
from mome_ray.jeet import COMMON, DDP_KWARGS, JEETConfig, JEETModel, JEETParts
from mome_ray.models import ModelConfig, build_gpt2
from mome_ray.moe import UNKNOWN, MoE, PLEExperts, Routing, load_ple, text_router
from mome_ray.training import build_optimizer, TrainConfig

LANGS = ["en", "fr", "de", "py"]
V, T = 64, 12
TINY = ModelConfig(n_layer=2, n_embd=32, n_head=2, n_positions=32)


def gpt2(seed: int):
    torch.manual_seed(seed)
    return build_gpt2(TINY, V, eos_id=0, pad_id=1).eval()


def jeet(common: bool = False, gate: bool = False, seed: int = 0, parts: JEETParts | None = None) -> JEETModel:
    torch.manual_seed(seed)
    return JEETModel(JEETConfig(LANGS, V, 0, 1, TINY, common=common, gate=gate, parts=parts or JEETParts())).eval()


PAPER_PARTS = JEETParts(expert_wpe=True, expert_ln_f=True, untied_head=True)  # the paper's public code


def ple(common: bool = False) -> PLEExperts:
    names = LANGS + ([COMMON] if common else [])
    return PLEExperts({n: gpt2(i) for i, n in enumerate(names)})


def batch(n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, V, (n, T), generator=torch.Generator().manual_seed(seed))


def routing(index: list[int]) -> Routing:
    """Routing whose probabilities put 0.6 on the chosen expert and share the rest (unknown: uniform)."""
    idx = torch.tensor(index)
    probs = torch.full((len(index), len(LANGS)), 0.4 / (len(LANGS) - 1))
    probs[idx >= 0, idx[idx >= 0]] = 0.6
    probs[idx < 0] = 1 / len(LANGS)
    return Routing(idx, probs)


def always(k: int):
    return lambda ids, mask=None: routing([k] * len(ids))


# --- routing equals the chosen expert


@pytest.mark.parametrize("k", range(len(LANGS)))
def test_ple_router_always_k_equals_expert_k(k):
    experts = ple()
    ids = batch()
    with torch.no_grad():
        out = MoE(experts, always(k))(ids)
        torch.testing.assert_close(out.logits, experts.models[LANGS[k]](input_ids=ids).logits, rtol=0, atol=1e-5)
    assert out.experts == [(LANGS[k],)] * len(ids)


@pytest.mark.parametrize("k", range(len(LANGS)))
def test_jeet_router_always_k_equals_exported_expert_k(k):
    model = jeet()
    ids = batch()
    with torch.no_grad():
        got = MoE(model, always(k))(ids).logits
        want = model.expert_lm(LANGS[k]).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bank", [ple, jeet])
def test_topk_with_k1_equals_hard_routing(bank):
    moe = MoE(bank())
    ids, r = batch(6), routing([0, 3, 1, 1, 2, 0])
    with torch.no_grad():
        hard = moe(ids, routing=r).logits.log_softmax(-1)
        top1 = moe(ids, routing=r, mode="topk", k=1).logits
    torch.testing.assert_close(top1, hard, rtol=0, atol=1e-5)


def test_top2_is_the_weighted_mixture_of_the_two_experts():
    experts = ple()
    ids = batch(2)
    r = Routing(torch.tensor([2, 0]), torch.tensor([[0.1, 0.2, 0.6, 0.1], [0.5, 0.0, 0.2, 0.3]]))
    with torch.no_grad():
        got = MoE(experts)(ids, routing=r, mode="topk", k=2).logits
        p = {n: m(input_ids=ids).logits.softmax(-1) for n, m in experts.models.items()}
    want0 = (0.6 * p["de"][0] + 0.2 * p["fr"][0]) / 0.8
    want1 = (0.5 * p["en"][1] + 0.3 * p["py"][1]) / 0.8
    torch.testing.assert_close(got.exp(), torch.stack([want0, want1]), rtol=0, atol=1e-6)


# --- per-sequence routing in a mixed batch


@pytest.mark.parametrize("bank", [ple, lambda: jeet(common=True)])
@pytest.mark.parametrize("padded", [False, True])
def test_mixed_batch_equals_each_sequence_alone(bank, padded):
    moe = MoE(bank())
    index = [0, 3, UNKNOWN, 1, 0, 2]
    ids = batch(len(index))
    lengths = [T, 7, 9, T, 4, 10] if padded else [T] * len(index)
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    ids = ids.masked_fill(mask == 0, 1)  # right padding with pad_id
    with torch.no_grad():
        together = moe(ids, mask if padded else None, routing=routing(index)).logits
        for i, n in enumerate(lengths):
            alone = moe(ids[i:i + 1, :n], routing=routing([index[i]])).logits[0]
            torch.testing.assert_close(together[i, :n], alone, rtol=0, atol=1e-5)


def test_a_mixed_batch_runs_the_shared_parts_once(monkeypatch):
    """MoE-CE routed over every language: each language stack once on its rows, the common stack once over the
    whole batch (not once per language), the head once; top-2 mixing too (one head per member it mixes)."""
    model = jeet(common=True)
    stacks, heads = [], []
    stack, head = model._stack, model.head
    monkeypatch.setattr(model, "_stack", lambda name, ids, *a, **k: stacks.append((name, len(ids))) or stack(name, ids, *a, **k))
    monkeypatch.setattr(model, "head", lambda h: heads.append(len(h)) or head(h))
    moe = MoE(model)
    with torch.no_grad():
        moe(batch(6), routing=routing([0, 3, UNKNOWN, 1, 0, 2]))
    assert sorted(stacks) == sorted([(COMMON, 6), ("en", 2), ("fr", 1), ("de", 1), ("py", 1)]) and heads == [6]
    stacks.clear(), heads.clear()
    with torch.no_grad():
        moe(batch(2), routing=Routing(torch.tensor([0, 1]), torch.tensor([[0.6, 0.3, 0.1, 0.0], [0.1, 0.5, 0.4, 0.0]])),
            mode="topk", k=2)
    assert sorted(stacks) == sorted([(COMMON, 2), ("en", 1), ("fr", 2), ("de", 1)]) and sorted(heads) == [1, 1, 2]


def test_unknown_goes_to_the_common_expert():
    for moe in (MoE(ple(common=True)), MoE(jeet(common=True))):
        ids = batch(3)
        with torch.no_grad():
            out = moe(ids, routing=routing([UNKNOWN, 1, UNKNOWN]))
            torch.testing.assert_close(out.logits[[0, 2]], moe(ids[[0, 2]], force=COMMON).logits, rtol=0, atol=1e-6)
        assert out.experts[0] == (COMMON,)


def test_unknown_without_common_goes_to_the_most_probable_expert():
    moe = MoE(ple())
    ids = batch(1)
    r = Routing(torch.tensor([UNKNOWN]), torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    with torch.no_grad():
        assert torch.equal(moe(ids, routing=r).logits, moe(ids, force="py").logits)


# --- MoE-CE


@pytest.mark.parametrize("gate", [False, True])
def test_moe_ce_is_the_mean_of_common_and_expert_hidden_states(gate):
    model = jeet(common=True, gate=gate)
    ids = batch(3)
    with torch.no_grad():
        if gate:
            model.gate.copy_(torch.tensor([0.0, 1.5, -2.0, 0.3]))
        got = MoE(model)(ids, force="de").logits  # common=True is MoE-CE's default
        h_de = model.expert_lm("de").transformer(input_ids=ids).last_hidden_state
        h_common = model.expert_lm(COMMON).transformer(input_ids=ids).last_hidden_state
    g = torch.sigmoid(torch.tensor(-2.0)) if gate else 0.5
    want = ((1 - g) * h_common + g * h_de) @ model.wte.weight.T
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_evaluation_grid_rows_are_one_call_each():
    moe = MoE(jeet(common=True), always(1))
    ids, mask = batch(4), torch.ones(4, T, dtype=torch.long)
    with torch.no_grad():
        rows = {
            "router+common": moe(ids, mask), "router": moe(ids, mask, common=False),
            "fr+common": moe(ids, mask, force="fr"), "fr": moe(ids, mask, force="fr", common=False),
            "common": moe(ids, mask, force=COMMON), "uniform": moe(ids, mask, force=moe.names, common=False),
            "fr+py": moe(ids, mask, force=["fr", "py"]), "top2": moe(ids, mask, mode="topk", k=2),
        }
    assert torch.equal(rows["router+common"].logits, rows["fr+common"].logits)
    assert torch.equal(rows["router"].logits, rows["fr"].logits)
    assert rows["uniform"].experts[0] == tuple(LANGS) and rows["common"].experts[0] == (COMMON,)
    top2 = rows["top2"].experts[0]  # fr and one of the tied runners-up, + common
    assert len(top2) == 3 and "fr" in top2 and top2[-1] == COMMON
    assert not torch.allclose(rows["fr"].logits, rows["fr+common"].logits)
    shared, stack = 64 * 32 + 32 * 32 + 2 * 32, sum(p.numel() for p in moe.experts.stacks["fr"].parameters())
    assert moe.active_params(force="fr", common=False) == shared + stack
    assert moe.active_params() == shared + 2 * stack
    assert moe.active_params(force=moe.names, common=False) == shared + 4 * stack
    assert moe.total_params() == shared + 5 * stack
    ple_moe = MoE(ple())
    assert ple_moe.active_params(mode="topk", k=2) == 2 * ple_moe.active_params() == ple_moe.total_params() // 2


# --- averaging hidden states vs distributions; the language + code pair rows


@pytest.mark.parametrize("common", [False, True])
@pytest.mark.parametrize("parts", [JEETParts(), PAPER_PARTS])
def test_hidden_average_is_the_head_on_the_mean_hidden_state(common, parts):
    model = jeet(common=True, parts=parts)
    moe, ids = MoE(model), batch(3)
    with torch.no_grad():
        for p in model.parameters():  # experts far from uniform, so the two averages differ clearly
            p.add_(0.3 * torch.randn_like(p))
        got = moe(ids, force=LANGS, common=common, mix="hidden")
        want = model.head(torch.stack([model.hidden(l, ids, None, common) for l in LANGS]).mean(0))
        probs = moe(ids, force=LANGS, common=common)  # the default: the mean of the distributions
        one = moe(ids, force="fr", common=common, mix="hidden")  # one expert: nothing to average
    torch.testing.assert_close(got.logits, want, rtol=0, atol=1e-5)
    assert got.experts == probs.experts
    assert (torch.log_softmax(got.logits, -1) - probs.logits).abs().max() > 0.1
    assert torch.equal(one.logits, moe(ids, force="fr", common=common).logits)


def test_hidden_average_needs_a_shared_head():
    with pytest.raises(MomeError, match="whole models with heads of their own.*mix='probs'"):
        MoE(ple())(batch(2), force=LANGS, mix="hidden")
    with pytest.raises(MomeError, match="unknown MoE mix 'mean'"):
        MoE(jeet())(batch(2), force=LANGS, mix="mean")


def test_grid_rows_label_the_averages_and_add_language_code_pairs():
    route = lambda lang: always(0)  # noqa: E731
    natural = [l for l in LANGS if l != "py"]
    for label, moe, mean, plus in (("PLE", MoE(ple()), "distribution mean", ""), ("JEET", MoE(jeet()), "hidden mean", ""),
                                   ("MoE-CE", MoE(jeet(common=True)), "hidden mean", " + common")):
        rows = {r.row: r for r in moe_rows(label, moe, route, "oracle", 2, code_langs=["py", "js"])}
        assert "uniform average (distribution mean)" in rows
        assert ("uniform average (hidden mean)" in rows) == (label != "PLE")
        pairs = {r for r in rows if " + py (" in r}
        assert pairs == {f"expert {l} + py ({mean}){plus}" for l in natural}
        pair = rows[f"expert fr + py ({mean}){plus}"]
        ids = batch(2)
        with torch.no_grad():
            want = moe(ids, force=["fr", "py"], mix="hidden" if label != "PLE" else "probs").logits
            assert torch.equal(pair.modules("en")(input_ids=ids).logits, want)
        assert pair.active == moe.active_params(force=["fr", "py"])
        assert not [r for r in moe_rows(label, moe, route, "oracle", 2) if " + py (" in r.row]  # no code_langs


def test_loss_and_score_agree():
    moe = MoE(ple(), always(2))
    ids = batch(3)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = moe(ids, mask, labels=labels)
        scores = moe.score(ids, mask)
    assert scores.logprobs.shape == (3, T - 1) and scores.experts == [("de",)] * 3
    torch.testing.assert_close(out.loss, -scores.logprobs.sum() / mask[:, 1:].sum(), rtol=1e-5, atol=1e-6)


# --- training JEET


@pytest.mark.parametrize("common", [False, True])
def test_jeet_step_changes_only_selected_stacks_and_shared_parts(common):
    model = jeet(common=common, gate=common).train()
    moe = MoE(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, TrainConfig(lr=1e-2))
    ids = batch(4)
    out = moe(ids, labels=ids, routing=Routing.onehot(torch.tensor([0, 3, 0, 3]), len(LANGS)))  # en and py
    out.loss.backward()
    opt.step()
    ran = {"en", "py"} | ({COMMON} if common else set())
    for name, p in model.named_parameters():
        stack = name.split(".")[1] if name.startswith("stacks.") else None
        changed = not torch.equal(p, before[name])
        if stack is None and name != "gate":
            assert changed, f"shared parameter {name} did not change"
        elif stack is not None:
            assert changed == (stack in ran), f"{name}: changed={changed}, stack ran={stack in ran}"
    if common:  # the gate entries of experts that did not run keep their value
        assert torch.equal(model.gate[[1, 2]], before["gate"][[1, 2]]) and not torch.equal(model.gate, before["gate"])


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    """Two DDP steps where rank 0 routes only to en and rank 1 to fr and py: de runs on no rank."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))  # a hang fails the test instead of blocking it
    model = jeet(common=True).train()  # same seed: same weights on both ranks
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    moe = DistributedDataParallel(MoE(model), **DDP_KWARGS)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        ids = batch(2, seed=10 * rank + step)
        out = moe(ids, labels=ids, routing=Routing.onehot(torch.tensor([[0, 0], [1, 3]][rank]), len(LANGS)))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    changed = sorted({n.split(".")[1] for n, p in model.named_parameters()
                      if n.startswith("stacks.") and not torch.equal(p, before[n])})
    (Path(out_dir) / f"{rank}.json").write_text(json.dumps(
        {"ranks_equal": torch.equal(gathered[0], gathered[1]), "changed_stacks": changed}))
    dist.destroy_process_group()


@pytest.mark.ray  # by cost, not a unit test: two processes that each import torch and transformers (~45 s loaded)
def test_jeet_under_ddp_with_unused_stacks_does_not_hang_and_ranks_agree(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = json.loads((tmp_path / f"{rank}.json").read_text())
        assert result == {"ranks_equal": True, "changed_stacks": sorted([COMMON, "en", "fr", "py"])}


# --- artifacts and modularity


def test_jeet_save_load_round_trip(tmp_path):
    model = jeet(common=True, gate=True)
    with torch.no_grad():
        model.gate.fill_(0.7)
    model.save(tmp_path / "jeet")
    loaded = JEETModel.load(tmp_path / "jeet").eval()
    assert loaded.cfg == model.cfg
    ids, r = batch(4), routing([0, 1, UNKNOWN, 3])
    with torch.no_grad():
        assert torch.equal(MoE(model)(ids, routing=r).logits, MoE(loaded)(ids, routing=r).logits)
    assert not list(tmp_path.glob("jeet/*.pt")) and not list(tmp_path.glob("jeet/*.bin"))


@pytest.mark.parametrize("parts", [JEETParts(expert_wpe=True), JEETParts(expert_ln_f=True),
                                   JEETParts(untied_head=True), PAPER_PARTS])
def test_jeet_parts_round_trip_export_and_count(tmp_path, parts):
    model = jeet(common=True, parts=parts)
    with torch.no_grad():  # the head's bias starts at 0: make it count
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save(tmp_path / "jeet")
    loaded = JEETModel.load(tmp_path / "jeet").eval()
    assert loaded.cfg == model.cfg and loaded.cfg.parts == parts
    names = set(loaded.state_dict())
    assert ("wpe.fr.weight" in names) == parts.expert_wpe and ("wpe.weight" in names) != parts.expert_wpe
    assert ("ln_f.common.weight" in names) == parts.expert_ln_f
    assert ("lm_head.bias" in names) == parts.untied_head
    ids, r = batch(4), routing([0, 1, UNKNOWN, 3])
    with torch.no_grad():
        assert torch.equal(MoE(model)(ids, routing=r).logits, MoE(loaded)(ids, routing=r).logits)
        for name in ("fr", COMMON):  # the exported HF model carries the expert's own parts and the head
            want = MoE(loaded)(ids, force=name, common=False).logits
            torch.testing.assert_close(loaded.expert_lm(name).eval()(input_ids=ids).logits, want, rtol=0, atol=1e-5)
    C, stack = TINY.n_embd, sum(p.numel() for p in model.stacks["fr"].parameters())
    wpe, ln_f, head = TINY.n_positions * C, 2 * C, V * C + V
    own = stack + wpe * parts.expert_wpe + ln_f * parts.expert_ln_f  # each member's
    shared = V * C + wpe * (not parts.expert_wpe) + ln_f * (not parts.expert_ln_f) + head * parts.untied_head
    moe = MoE(loaded)
    assert moe.active_params(force="fr", common=False) == shared + own
    assert moe.active_params() == shared + 2 * own  # routed: the expert + the common stack
    assert moe.active_params(force=LANGS, common=False) == shared + 4 * own
    assert moe.total_params() == shared + 5 * own


def test_ple_from_directories(tmp_path):
    models = {n: gpt2(i) for i, n in enumerate(LANGS[:2])}
    for n, m in models.items():
        m.save_pretrained(tmp_path / n)
    experts = load_ple({n: tmp_path / n for n in models}).eval()
    ids = batch(2)
    with torch.no_grad():
        torch.testing.assert_close(MoE(experts)(ids, force="fr").logits, models["fr"](input_ids=ids).logits, rtol=0,
                                   atol=1e-5)
    with pytest.raises(MomeError, match="config.json missing"):
        load_ple({"de": tmp_path / "de"})


def test_adding_an_expert_leaves_the_others_bit_identical():
    experts = ple()
    moe = MoE(experts)
    ids = batch(4)
    with torch.no_grad():
        before = {n: moe(ids, force=n).logits for n in LANGS}
        experts.add("es", gpt2(99))
        assert moe.names == LANGS + ["es"]
        for n in LANGS:
            assert torch.equal(moe(ids, force=n).logits, before[n])
        torch.testing.assert_close(moe(ids, force="es").logits, experts.models["es"](input_ids=ids).logits, rtol=0,
                                   atol=1e-5)


# --- generation


@pytest.mark.parametrize("bank", [ple, jeet, lambda: jeet(common=True, parts=PAPER_PARTS)])
def test_generate_is_deterministic_for_a_seed_and_greedy_at_temperature_0(bank):
    moe = MoE(bank(), always(1))
    prompt = batch(2)[:, :4]
    a = moe.generate(prompt, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3)
    assert a.shape == (2, 10) and torch.equal(a[:, :4], prompt)
    assert torch.equal(a, moe.generate(prompt, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3))
    samples = {tuple(moe.generate(prompt, max_new_tokens=6, temperature=1.5, seed=s)[0].tolist()) for s in range(4)}
    assert len(samples) > 1
    greedy = moe.generate(prompt, max_new_tokens=6, temperature=0, seed=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, moe(ids, force="fr").logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy, ids)
    mixes = ["probs", "hidden"] if moe.experts.shares_head else ["probs"]
    for mix in mixes:  # decoding computes the last position only: the same tokens as the full forward's
        ids = prompt
        with torch.no_grad():
            for _ in range(4):
                ids = torch.cat([ids, moe(ids, mode="topk", k=2, mix=mix).logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(moe.generate(prompt, max_new_tokens=4, temperature=0, mode="topk", k=2, mix=mix), ids)


@pytest.mark.parametrize("bank", [ple, lambda: jeet(common=True)])
def test_decoding_past_the_context_slides_the_window_as_without_a_cache(bank):
    """The experts' KV caches restart on the last n_positions tokens once the text is longer: the same tokens
    as a full forward over that window at every step."""
    moe = MoE(bank(), always(2))
    prompt = batch(2)[:, :TINY.n_positions - 3]
    ids = prompt
    with torch.no_grad():
        for _ in range(8):  # 5 steps past the context
            window = ids[:, -TINY.n_positions:]
            ids = torch.cat([ids, moe(window, force="de").logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(moe.generate(prompt, max_new_tokens=8, temperature=0, force="de"), ids)


def test_generate_pads_after_eos():
    moe = MoE(ple(), always(0))
    prompt = batch(1)[:, :3]
    with torch.no_grad():
        first = moe(prompt, force="en").logits[0, -1].argmax().item()
    out = moe.generate(prompt, max_new_tokens=5, temperature=0, eos_id=first)
    assert out.tolist() == [prompt[0].tolist() + [first]]  # stopped: every sequence ended


# --- the router adapter


class FakeClassifier:
    """Classifies a text by its first character; columns in an order unlike the experts'."""

    classes = ["py", "unknown", "en", "fr", "de"]

    def __init__(self):
        self.seen = []

    def predict_proba(self, texts):
        self.seen.extend(texts)
        probs = np.full((len(texts), len(self.classes)), 0.05)
        for i, t in enumerate(texts):
            probs[i, {"p": 0, "u": 1, "e": 2, "d": 4}[t[0]]] = 0.8
        return self.classes, probs


class FakeTokenizer:
    def batch_decode(self, rows):
        return ["".join("pued"[t % 4] for t in row) for row in rows]


def test_text_router_decodes_masked_ids_and_maps_classes_to_experts():
    clf = FakeClassifier()
    route = text_router(clf, FakeTokenizer(), LANGS)
    ids = torch.tensor([[2, 0, 0], [0, 1, 1], [1, 2, 2], [3, 3, 0]])  # e, p, u(nknown), d
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0]])
    r = route(ids, mask)
    assert clf.seen == ["ep", "puu", "uee", "d"]
    assert r.index.tolist() == [0, 3, UNKNOWN, 2]
    torch.testing.assert_close(r.probs[0], torch.tensor([0.8, 0.05, 0.05, 0.05]))
    moe = MoE(ple(common=True), route)
    with torch.no_grad():
        assert moe(ids, mask).experts == [("en",), ("py",), (COMMON,), ("de",)]
    with pytest.raises(MomeError, match="no class for expert"):
        text_router(clf, FakeTokenizer(), LANGS + ["es"])(ids, mask)


def test_text_router_honours_the_classifiers_unknown_threshold():
    clf = FakeClassifier()
    clf.unknown_below = 0.9  # the fake's top probability is 0.8: every sequence is unknown
    r = text_router(clf, FakeTokenizer(), LANGS)(torch.tensor([[2, 0, 0]]))
    assert r.index.tolist() == [UNKNOWN]


# --- user mistakes


def test_clear_errors_for_user_mistakes():
    moe = MoE(ple())
    ids = batch(2)
    with pytest.raises(MomeError, match="no expert"):
        moe(ids, force="xx")
    with pytest.raises(MomeError, match="non-empty"):
        moe(ids[:0])
    with pytest.raises(MomeError, match="no router"):
        moe(ids)
    with pytest.raises(MomeError, match="cannot be averaged"):
        moe(ids, force="en", common=True)
    with pytest.raises(MomeError, match="vocabulary"):
        moe.experts.add("es", build_gpt2(TINY, V + 1, 0, 1))
    with pytest.raises(MomeError, match="expected"):
        moe(ids, routing=Routing(torch.tensor([0, 1]), torch.ones(2, 3)))
    with pytest.raises(MomeError, match="expected"):
        moe(ids, routing=Routing(torch.tensor([0, 4]), torch.ones(2, 4)))
    with pytest.raises(MomeError, match="temperature"):
        moe.generate(ids, temperature=-1, force="en")
    with pytest.raises(MomeError, match="not a language"):
        JEETConfig(LANGS + [COMMON], V, 0, 1, TINY)
    with pytest.raises(MomeError, match="needs common=True"):
        JEETConfig(LANGS, V, 0, 1, TINY, gate=True)
