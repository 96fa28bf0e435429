"""inference.py computes what HF's GPT-2 modules compute: the expert banks in eval mode (our blocks) against the
same weights in train mode with no dropout (HF's blocks), on padded batches and through a KV cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mome_ray.decoding import pad_rows
from mome_ray.inference import attention, linear_t
from mome_ray.jeet import JEETParts
from mome_ray.models import kv_cache

from tests.test_moe import PAPER_PARTS, V, jeet, ple

BANKS = {"ple": lambda: ple(), "moe-ce": lambda: jeet(common=True), "paper-parts": lambda: jeet(parts=PAPER_PARTS)}


def both(bank, fn):
    """fn() in eval mode (inference.py) and in train mode (HF's modules; the tiny models have no dropout)."""
    with torch.no_grad():
        ours = fn(bank.eval())
        theirs = fn(bank.train())
    bank.eval()
    return ours, theirs


def padded(left: bool):
    """(ids, mask, positions) of three rows of 9, 5 and 1 real tokens, padded to 9 on the left or the right."""
    ids = torch.randint(2, V, (3, 9), generator=torch.Generator().manual_seed(1)).tolist()
    return pad_rows([ids[0], ids[1][:5], ids[2][:1]], left=left)


@pytest.mark.parametrize("name", list(BANKS))
@pytest.mark.parametrize("left", [False, True])
def test_our_blocks_give_hf_logits_on_every_real_token_of_a_padded_batch(name, left):
    bank, (ids, mask, positions) = BANKS[name](), padded(left)
    expert = bank.names[1]
    ours, theirs = both(bank, lambda b: b.logits(expert, ids, mask, False, positions=positions))
    real = mask.bool()
    assert torch.isfinite(ours).all()  # padding positions too: a NaN there would poison later layers' keys
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(BANKS))
def test_decoding_through_the_cache_gives_hf_logits_step_by_step(name):
    bank, (ids, mask, positions) = BANKS[name](), padded(left=True)
    common = name == "moe-ce"
    expert = bank.names[2]

    def decode(b):
        cache: dict = {}
        out = [b.logits(expert, ids, mask, common, last=True, cache=cache, positions=positions)]
        step_mask, nxt = mask, out[0].argmax(-1)
        for _ in range(4):
            step_mask = torch.cat([step_mask, step_mask.new_ones(3, 1)], 1)
            positions_now = step_mask.sum(1, keepdim=True) - 1
            out.append(b.logits(expert, nxt, step_mask, common, last=True, cache=cache, positions=positions_now))
            nxt = out[-1].argmax(-1)
        return torch.cat(out, 1)

    ours, theirs = both(bank, decode)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_a_cache_filled_by_our_blocks_is_read_by_hf_and_back():
    bank = ple()
    model, ids = bank.models["en"], torch.randint(2, V, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache: dict = {}
        bank.eval().logits("en", ids[:, :5], None, False, cache=cache)  # ours fills the cache
        hf_next = model.train()(input_ids=ids[:, 5:], past_key_values=kv_cache(cache, "en", model.config),
                                use_cache=True).logits
        whole = bank.eval().logits("en", ids, None, False)
    torch.testing.assert_close(hf_next, whole[:, 5:], atol=1e-5, rtol=1e-5)


def test_a_padding_position_attends_to_itself_only_and_no_row_is_empty():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    seen = attention(mask, queries=4, length=4)[:, 0]
    assert seen.any(-1).all()
    assert seen[0, 0].tolist() == [True, False, False, False]  # padding: itself
    assert seen[0, 3].tolist() == [False, False, True, True]  # a real token: real columns up to its own
    assert attention(torch.ones(2, 4, dtype=torch.long), queries=4, length=4) is None  # plain causal: SDPA's own
    assert attention(None, queries=1, length=9) is None  # one new token sees every cached one
    assert attention(None, queries=2, length=5)[0, 0].tolist() == [[True] * 4 + [False], [True] * 5]


def test_the_transposed_head_follows_the_weight_when_it_changes():
    weight = torch.nn.Parameter(torch.randn(V, 8))
    h = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(linear_t(h, weight), F.linear(h, weight))
        weight.mul_(2)  # an optimizer step, a load_state_dict: in place
        torch.testing.assert_close(linear_t(h, weight), F.linear(h, weight))
    out = linear_t(h, weight)  # autograd on: F.linear, with a gradient
    out.sum().backward()
    assert weight.grad is not None


def test_every_jeet_part_layout_runs_in_both_modes():
    for parts in (JEETParts(), JEETParts(expert_wpe=True), JEETParts(untied_head=True)):
        bank = jeet(parts=parts)
        ids = torch.randint(2, V, (2, 6), generator=torch.Generator().manual_seed(3))
        ours, theirs = both(bank, lambda b: b.logits("de", ids, None, False))
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
