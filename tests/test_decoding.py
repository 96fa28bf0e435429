"""Continuous batching (mome_ray/decoding.py) on tiny models: joining a running batch changes no request's text."""

from __future__ import annotations

import asyncio

import pytest
import torch

from mome_ray.decoding import Decoder, GenRequest, Streams
from mome_ray.errors import MomeError
from mome_ray.moe import MoE, Routing
from tests.test_moe import PAPER_PARTS, TINY, jeet, ple, routing

BANKS = {"ple": ple, "jeet": jeet, "moe-ce": lambda: jeet(common=True, parts=PAPER_PARTS)}


def requests() -> list[tuple[GenRequest, dict]]:
    """Prompts of different lengths, greedy and sampled, routed, forced and mixed, one near the context's end."""
    top2 = {"routing": Routing(torch.tensor([1]), torch.tensor([[0.2, 0.5, 0.1, 0.2]])), "mode": "topk", "k": 2}
    return [(GenRequest([2, 5, 9, 13, 2, 7, 7, 30, 41], 12, temperature=0.0), {"routing": routing([2])}),
            (GenRequest([2, 7], 9, temperature=0.9, seed=3), {"force": "fr"}),
            (GenRequest([2, 3, 4], 6, temperature=1.2, top_p=0.8, seed=5), top2),
            (GenRequest(list(range(2, 28)), 10, temperature=0.7, seed=1), {"force": "py"}),  # slides past 32
            (GenRequest([2, 3, 4, 5], 7, temperature=0.0), {"routing": routing([-1])})]  # unknown: the fallback


def run_alone(moe: MoE, req: GenRequest, select: dict) -> list[int]:
    decoder = Decoder(moe)
    decoder.add(req, **dict(select))
    tokens = []
    while decoder.busy:
        tokens += [t for _, t in decoder.step()]
    return tokens


@pytest.mark.parametrize("name", BANKS)
def test_a_request_joining_a_running_batch_gets_the_text_it_gets_alone(name):
    moe = MoE(BANKS[name]())
    reqs = requests()
    alone = [run_alone(moe, r, s) for r, s in reqs]
    decoder, made = Decoder(moe, max_batch=3), {}
    seqs = []
    for r, s in reqs:  # one joins per step; at most 3 decode at once, the others wait their turn
        seqs.append(decoder.add(r, **dict(s)))
        for seq, token in decoder.step():
            made.setdefault(id(seq), []).append(token)
        assert decoder.running <= 3
    for _ in range(100):
        if not decoder.busy:
            break
        for seq, token in decoder.step():
            made.setdefault(id(seq), []).append(token)
    assert not decoder.busy and not decoder.batches
    assert [made[id(s)] for s in seqs] == alone
    assert [len(t) for t in alone][:3] == [12, 9, 6]
    ids = torch.tensor([reqs[0][0].ids])  # and greedy equals a full forward per token, no cache
    with torch.no_grad():
        for _ in range(12):
            ids = torch.cat([ids, moe(ids, routing=routing([2])).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert alone[0] == ids[0, len(reqs[0][0].ids):].tolist()


def test_static_batching_admits_only_when_the_batch_is_done_and_continuous_at_the_next_step():
    moe = MoE(ple())
    long, short = GenRequest([2, 3], 8, temperature=0.0), GenRequest([2, 4], 2, temperature=0.0)
    for admit, joined_at in (("continuous", 1), ("static", 7)):  # static: in the step the batch ends
        decoder = Decoder(moe, admit=admit)
        decoder.add(long, force="en")
        decoder.step()
        late = decoder.add(short, force="de")
        step = 1
        while late.made == 0:
            decoder.step()
            step += 1
        assert step - 1 == joined_at, admit
        while decoder.busy:
            decoder.step()
        assert late.ids[2:] == run_alone(moe, short, {"force": "de"})


def test_cancelled_and_finished_requests_leave_and_free_their_cache_columns():
    moe = MoE(jeet(common=True))
    decoder = Decoder(moe)
    long = decoder.add(GenRequest(list(range(2, 22)), 20, temperature=0.0), force="en")
    short = decoder.add(GenRequest([2, 3], 20, temperature=0.0), force="fr")
    decoder.step()
    (batch,) = decoder.batches.values()
    assert batch.mask.shape == (2, 20) and set(batch.cache) == {"en", "fr", "common"}  # common: both rows, once
    decoder.cancel(long)
    decoder.step()  # the long prompt's columns are cut: only the short one's 2 + 2 new tokens are left
    assert batch.seqs == [short] and batch.mask.shape == (1, 3) and set(batch.cache) == {"fr", "common"}
    assert all(layer.keys.shape[:3] == (1, 2, 3) for c in batch.cache.values() for layer in c.layers)
    decoder.cancel(short)
    decoder.step()
    assert not decoder.busy


def test_bad_requests_are_refused_before_anything_is_queued():
    decoder = Decoder(MoE(ple()))
    for req, select, match in [(GenRequest([], 4), {"force": "en"}, "at least one token"),
                               (GenRequest([2], 0), {"force": "en"}, "max_new_tokens >= 1"),
                               (GenRequest([2], 4, temperature=-1), {"force": "en"}, "temperature >= 0"),
                               (GenRequest([2], 4), {"force": "xx"}, "no expert"),
                               (GenRequest([2], 4), {}, "no router")]:
        with pytest.raises(MomeError, match=match):
            decoder.add(req, **select)
    assert not decoder.busy
    with pytest.raises(MomeError, match="unknown batching"):
        Decoder(MoE(ple()), admit="dynamic")


def test_streams_serve_concurrent_requests_and_fail_them_all_when_a_step_fails():
    moe = MoE(ple())
    reqs = requests()[:3]

    async def collect(streams, req, select, stream=True):
        return [t async for t in streams.generate(req, stream=stream, **dict(select))]

    delivered = []  # (request, tokens handed to the loop at once)

    async def together():
        streams = Streams(Decoder(moe))
        deliver = streams._deliver
        streams._deliver = lambda out: (delivered.extend((seq.req, len(t)) for seq, t, _ in out), deliver(out))
        return await asyncio.gather(*[collect(streams, r, s, stream=i != 1) for i, (r, s) in enumerate(reqs)])

    got = asyncio.run(together())
    for i, ((r, s), tokens) in enumerate(zip(reqs, got)):
        assert tokens[0] == Decoder(moe).add(r, **dict(s)).selected and sum(tokens[0].values()) == pytest.approx(1)
        assert tokens[1:] == run_alone(moe, r, s)
        # streamed: a token a time; not streamed: every token in one hand-over, when it is done
        assert [n for q, n in delivered if q is r] == ([1] * len(tokens[1:]) if i != 1 else [len(tokens[1:])])

    class Broken(MoE):
        def run(self, *args, **kwargs):
            raise RuntimeError("out of memory")

    async def broken():
        streams = Streams(Decoder(Broken(ple())))
        return await asyncio.gather(*[collect(streams, r, s) for r, s in reqs], return_exceptions=True)

    errors = asyncio.run(asyncio.wait_for(broken(), 30))
    assert all(isinstance(e, RuntimeError) and "out of memory" in str(e) for e in errors)


def test_generate_is_capped_by_the_context_only_through_the_sliding_window():
    """A request longer than the context is decoded on its last n_positions tokens, never refused."""
    moe = MoE(ple())
    long = GenRequest(list(range(2, 2 + TINY.n_positions + 5)), 3, temperature=0.0)
    window = GenRequest(long.ids[-TINY.n_positions:], 3, temperature=0.0)
    assert run_alone(moe, long, {"force": "de"}) == run_alone(moe, window, {"force": "de"})
