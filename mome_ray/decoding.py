"""Continuous batching for `moe.MoE`: a generation joins the running decode batch at the next step and leaves
when it is done, so a new request never waits for the longest one in a batch (static batching's cost).

    decoder = Decoder(moe, max_batch=16)              # any expert bank: PLE, JEET, MoE-CE (a teacher: a one-model PLE)
    seq = decoder.add(GenRequest(prompt_ids, 32, temperature=0.8, top_p=0.95, seed=1, eos_id=eos),
                      routing=routing)                # MoE.forward's selection: routing= | force= | mode="topk", k=
    while decoder.busy:
        for seq, token in decoder.step(): ...         # one new token per running request; seq.done after its last
    async for item in Streams(decoder).generate(req, **select): ...     # from asyncio (Serve): seq.selected, then tokens

A step:
1. every running request feeds its last token through the experts its selection runs, all rows at once:
   `MoE.run` with the batch's caches (routing, top-k mixing and the common expert exactly as evaluated), then
   samples its next token from its own generator (seeded: a seed gives the same text alone or in a batch);
2. waiting requests join while fewer than `max_batch` run (`admit="static"`: only when none runs, so a batch
   starts together and a new request waits for the longest one, as `@serve.batch` over a whole generation
   does): each is prefilled alone, which gives its first token, and its KV caches join the batch's;
3. a request that emitted its `eos_id` or its `max_new_tokens` leaves: its cache rows go, and cache columns no
   remaining row needs are cut.
A batch keeps one KV cache per expert stack that runs (rows: the requests that run it, in batch order), every
cache left-padded to one length with one attention mask, and each row's positions count its real tokens.
Requests that combine experts alike share a batch (one expert; a mix of distributions; of hidden states; ±
the common stack). Past `n_positions` a request slides its window: it is prefilled again on its last
`n_positions` tokens (as decoding always did).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mome_ray.errors import MomeError
from mome_ray.moe import MoE, Plan, sample_next

ADMITS = ("continuous", "static")


@dataclass
class GenRequest:
    ids: list[int]  # the prompt's token ids (at least one)
    max_new_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    eos_id: int | None = None  # stop after emitting it


@dataclass(eq=False)
class Seq:
    """One generation in a `Decoder`: its request, its row of the MoE's plan, what it has made."""

    req: GenRequest
    weights: torch.Tensor  # (M,) over the MoE's members
    kind: tuple  # (mix, common): requests of one kind share a batch
    selected: dict[str, float]  # the members it mixes, with their weights
    gen: torch.Generator
    ids: list[int]  # prompt + new tokens
    made: int = 0
    done: bool = False  # emitted eos or its max_new_tokens, or cancelled


@dataclass(eq=False)
class _Batch:
    seqs: list[Seq] = field(default_factory=list)
    cache: dict = field(default_factory=dict)  # stack key (the bank's) -> DynamicCache of its rows
    rows: dict = field(default_factory=dict)  # stack key -> the Seqs of its rows, in batch order
    mask: torch.Tensor | None = None  # (B, L): 1 where a cached column is a real token of that row


class Decoder:
    """Requests decoding together over one MoE; `step()` advances every one by a token. Not thread-safe except
    `add` and `cancel`, which may be called while `step` runs in another thread."""

    def __init__(self, moe: MoE, max_batch: int = 16, admit: str = "continuous"):
        if admit not in ADMITS:
            raise MomeError(f"unknown batching '{admit}'; use one of {list(ADMITS)}")
        if max_batch < 1:
            raise MomeError(f"a decode batch needs max_batch >= 1, got {max_batch}")
        self.moe, self.max_batch, self.admit = moe, max_batch, admit
        self.context = moe.experts.n_positions
        self.device = next(moe.parameters()).device
        self.waiting: deque[Seq] = deque()
        self.batches: dict[tuple, _Batch] = {}

    @property
    def running(self) -> int:
        return sum(len(b.seqs) for b in self.batches.values())

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or bool(self.batches)

    def add(self, req: GenRequest, **select) -> Seq:
        """Queue a generation: it joins at the next step. `select`: `MoE.forward`'s (routing=, force=, mode=,
        k=, common=, mix=). A bad request raises MomeError and queues nothing."""
        if not req.ids or req.max_new_tokens < 1:
            raise MomeError(f"a generation needs a prompt of at least one token and max_new_tokens >= 1, got "
                            f"{len(req.ids)} tokens and {req.max_new_tokens}")
        if req.temperature < 0 or not 0 < req.top_p <= 1:
            raise MomeError(f"generate needs temperature >= 0 and 0 < top_p <= 1, got {req.temperature} and {req.top_p}")
        ids = torch.tensor([req.ids], device=self.device)
        plan = self.moe.plan(ids, None, select.pop("routing", None), **select)
        seq = Seq(req, plan.weights[0], (plan.mix, plan.common), self.moe.selected_by(plan)[0],
                  torch.Generator(device=self.device).manual_seed(req.seed), list(req.ids))
        self.waiting.append(seq)
        return seq

    def cancel(self, seq: Seq) -> None:
        """Stop a generation (its client left): it leaves at the next step."""
        seq.done = True

    def clear(self) -> None:
        """Drop every request (after a failed step)."""
        self.waiting.clear()
        self.batches.clear()

    @torch.inference_mode()
    def step(self) -> list[tuple[Seq, int]]:
        """One token for every running request and for each request that joins now."""
        out: list[tuple[Seq, int]] = []
        joining: list[Seq] = []
        for batch in list(self.batches.values()):
            self._leave(batch)
            slid = [s for s, n in zip(batch.seqs, batch.mask.sum(1).tolist()) if n >= self.context]
            self._drop(batch, slid)  # no position left in the window: prefilled again on its last n_positions tokens
            if batch.seqs:
                self._decode(batch, out)
            joining += slid
        if self.admit == "continuous" or not self.running:
            while self.waiting and self.running + len(joining) < self.max_batch:
                seq = self.waiting.popleft()
                if not seq.done:
                    joining.append(seq)
        groups: dict[tuple, list[Seq]] = {}  # prefilled together: the same experts, so the same cache rows
        for s in joining:
            groups.setdefault((s.kind, tuple(s.weights.nonzero().flatten().tolist())), []).append(s)
        for group in groups.values():
            self._prefill(group, out)
        return out

    # --- a step's parts

    def _plan(self, seqs: list[Seq]) -> Plan:
        mix, common = seqs[0].kind
        return Plan(torch.stack([s.weights for s in seqs]), mix, common)

    def _decode(self, batch: _Batch, out: list) -> None:
        """Each row's last token through its experts, with the batch's caches."""
        tokens = torch.tensor([[s.ids[-1]] for s in batch.seqs], device=self.device)
        positions = batch.mask.sum(1, keepdim=True)  # real tokens cached = the next token's position
        mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.seqs), 1)], 1)
        padded = not bool(mask.all())  # no padding (one row, or rows alike): no mask to build
        logits = self.moe.run(tokens, mask if padded else None, self._plan(batch.seqs), last=True,
                              cache=batch.cache, positions=positions)[:, -1]
        batch.mask = mask
        self._sample(batch.seqs, logits, out)
        self._leave(batch)

    def _prefill(self, seqs: list[Seq], out: list) -> None:
        """Run the prompts (each one's last n_positions tokens) of requests that select the same experts as one
        left-padded batch; sample; join their kind's batch."""
        ids, mask, positions = (t.to(self.device) for t in pad_rows([s.ids[-self.context:] for s in seqs], left=True))
        cache: dict = {}
        logits = self.moe.run(ids, mask, self._plan(seqs), last=True, cache=cache, positions=positions)[:, -1]
        self._sample(seqs, logits, out)
        batch = self.batches.setdefault(seqs[0].kind, _Batch())
        self._join(batch, seqs, cache, mask)
        self._leave(batch)

    def _sample(self, seqs: list[Seq], logits: torch.Tensor, out: list) -> None:
        """Each request's next token from its row of (n, V) logits: greedy ones at once, the others from their
        own generators."""
        greedy = logits.argmax(-1).tolist()
        for seq, row, best in zip(seqs, logits, greedy):
            r = seq.req
            token = best if r.temperature == 0 else int(sample_next(row[None].float(), r.temperature, r.top_p, seq.gen)[0])
            seq.ids.append(token)
            seq.made += 1
            seq.done = seq.done or token == r.eos_id or seq.made >= r.max_new_tokens
            out.append((seq, token))

    def _join(self, batch: _Batch, seqs: list[Seq], cache: dict, mask: torch.Tensor) -> None:
        """Merge prefilled requests' caches (every key holds all their rows; `mask` (n, w)) into the batch's,
        left-padding both to one length."""
        have, length = (batch.mask.shape[1] if batch.seqs else 0), mask.shape[1]
        width = max(have, length)
        if batch.seqs and width > have:
            for c in batch.cache.values():
                _pad_left(c, width - have)
            batch.mask = F.pad(batch.mask, (width - have, 0))
        for key, c in cache.items():
            _pad_left(c, width - length)
            if key in batch.cache:
                for mine, new in zip(batch.cache[key].layers, c.layers):
                    mine.keys, mine.values = torch.cat([mine.keys, new.keys]), torch.cat([mine.values, new.values])
            else:
                batch.cache[key] = c
            batch.rows.setdefault(key, []).extend(seqs)
        mask = F.pad(mask, (width - length, 0))
        batch.mask = torch.cat([batch.mask, mask]) if batch.seqs else mask
        batch.seqs.extend(seqs)

    def _leave(self, batch: _Batch) -> None:
        """Drop the rows of requests that are done."""
        self._drop(batch, [s for s in batch.seqs if s.done])

    def _drop(self, batch: _Batch, gone: list[Seq]) -> None:
        """Take these requests' rows out of the batch (every cache once); cut the columns only they needed."""
        if not gone:
            return
        for key in list(batch.rows):
            rows = batch.rows[key]
            kept = [i for i, s in enumerate(rows) if s not in gone]
            if len(kept) == len(rows):
                continue
            if not kept:
                del batch.rows[key], batch.cache[key]
                continue
            index = torch.tensor(kept, device=self.device)
            for layer in batch.cache[key].layers:
                layer.keys, layer.values = layer.keys[index], layer.values[index]
            batch.rows[key] = [rows[i] for i in kept]
        keep = [i for i, s in enumerate(batch.seqs) if s not in gone]
        batch.seqs = [batch.seqs[i] for i in keep]
        if not batch.seqs:
            del self.batches[gone[0].kind]
            return
        batch.mask = batch.mask[keep]
        start = int(batch.mask.any(0).long().argmax())  # the first column some row still needs
        if start:
            batch.mask = batch.mask[:, start:]
            for c in batch.cache.values():
                for layer in c.layers:
                    layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]


def pad_rows(rows: list[list[int]], pad_id: int = 0, left: bool = False) -> tuple[torch.Tensor, ...]:
    """(ids, mask, positions) of rows padded to one length (left for generation, so every row's last token is
    at the end); positions count real tokens only, whatever the padding."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span], mask[i, span] = torch.tensor(r, dtype=torch.long), 1
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


def _pad_left(cache, n: int) -> None:
    """Prepend `n` empty (masked) columns to every layer of a DynamicCache."""
    if n:
        for layer in cache.layers:
            layer.keys, layer.values = F.pad(layer.keys, (0, 0, n, 0)), F.pad(layer.values, (0, 0, n, 0))


class Streams:
    """A `Decoder` driven for asyncio (a Serve replica): `generate` streams one request's tokens while a thread of
    its own steps the decoder for as long as any request is waiting or running (no event-loop hop per step),
    handing the loop each step's tokens of streamed requests and the whole of each finished one (a request that
    is not streamed wakes the loop once). `wait_s`: before a batch starts from idle, wait this long for others
    to join (static batching's window)."""

    def __init__(self, decoder: Decoder, wait_s: float = 0.0):
        self.decoder, self.wait_s = decoder, wait_s
        self.queues: dict[int, asyncio.Queue] = {}
        self.streamed: set[int] = set()  # the requests that hear of each token as it is made
        self.lock = threading.Lock()  # guards starting and ending the decode thread
        self.thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def generate(self, req: GenRequest, stream: bool = True, **select) -> AsyncIterator:
        """The request's `selected` members ({member: weight}) first, then each new token id: as it is made when
        `stream`, else all at once when the request is done."""
        seq = self.decoder.add(req, **select)  # a bad request raises here: nothing queued
        queue = self.queues[id(seq)] = asyncio.Queue()
        if stream:
            self.streamed.add(id(seq))
        self.loop = asyncio.get_running_loop()
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="decode", daemon=True)
                self.thread.start()
        try:
            yield seq.selected
            while (tokens := await queue.get()) is not None:
                if isinstance(tokens, BaseException):
                    raise tokens
                for token in tokens:
                    yield token
        finally:  # done, failed, or the consumer left: stop decoding it
            self.decoder.cancel(seq)
            self.queues.pop(id(seq), None)
            self.streamed.discard(id(seq))

    def _run(self) -> None:
        """The decode thread: step until nothing waits or runs."""
        try:
            while True:
                with self.lock:
                    if not self.decoder.busy:
                        self.thread = None
                        return
                if self.wait_s and not self.decoder.running:
                    time.sleep(self.wait_s)
                out = [(seq, [token] if id(seq) in self.streamed else seq.ids[len(seq.req.ids):], seq.done)
                       for seq, token in self.decoder.step() if seq.done or id(seq) in self.streamed]
                if self.loop.is_closed():  # nobody left to read (the loop's program ended)
                    raise asyncio.CancelledError
                if out:
                    self.loop.call_soon_threadsafe(self._deliver, out)
        except (Exception, asyncio.CancelledError) as e:  # a step failed: every open request fails with it
            self.decoder.clear()
            with self.lock:
                self.thread = None
            if not self.loop.is_closed():
                self.loop.call_soon_threadsafe(self._fail, e)

    def _deliver(self, out: list) -> None:
        for seq, tokens, done in out:
            if (queue := self.queues.get(id(seq))) is not None:
                queue.put_nowait(tokens)
                if done:
                    queue.put_nowait(None)

    def _fail(self, error: Exception) -> None:
        for queue in self.queues.values():
            queue.put_nowait(error)
