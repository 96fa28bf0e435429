"""The mixture of modular experts: one interface over PLE, JEET and MoE-CE.

Experts are named by language (`["en", "fr", "de", "py"]`) plus an optional `common` expert. Routing is
per sequence: a router maps (B, T) ids (+ attention mask) to a `Routing` — one expert index per sequence
(−1 = unknown) and a (B, E) probability matrix over the language experts, in `moe.names` order.

    moe = MoE(load_ple({"en": "run/experts/en", "fr": "run/experts/fr"}), router)      # PLE
    moe = MoE(JEETModel(JEETConfig(langs, vocab, eos, pad, common=True)), router)       # MoE-CE (jeet.py)
    out = moe(ids, attention_mask, labels=ids)          # out.logits (B, T, V), out.loss, out.experts
    out = moe.score(ids, attention_mask)                # out.logprobs (B, T-1): log p(next token)
    new = moe.generate(prompt_ids, max_new_tokens=50, temperature=0.8, top_p=0.95, seed=0, eos_id=eos)
    for token in moe.decode(prompt_ids, 50, routing=decide(labels, probs, moe.names)): ...   # (B,) per step

How a batch runs:
- hard top-1 (default): sequences are grouped by expert, each expert runs once on its group, and the
  logits are scattered back into batch order.
- `mode="topk"` (beyond the paper): the k most probable experts are mixed (see `mix`) with the renormalised
  router probabilities; mixing distributions returns the log of the mixture as logits.
- `force="fr"` runs one named expert on every sequence; `force=["en", "py"]` mixes the named experts
  with equal weights.
- How experts are mixed (`mix`): `"probs"` (default) mixes their next-token *distributions*; `"hidden"`
  averages their last hidden states with the same weights and applies the shared head once (JEET and
  MoE-CE, whose experts share the head; PLE's whole models can only mix distributions).
- `unknown` (index −1) goes to the common expert when there is one, else to the most probable expert
  (`fallback`); `decide` turns a text classifier's answer into a `Routing`. The evaluation grid and the
  Serve app (serve/app.py) both route and mix through this module: what is served is what was evaluated.
- `common=True` (MoE-CE only; its default) averages the common stack's last hidden state with the
  selected expert's before the head; `common=False` runs the selected stack alone.

The evaluation grid, one call per row:
    router over all experts ± common     moe(ids, mask, common=True | False)
    each expert forced ± common          moe(ids, mask, force="fr", common=True | False)
    common expert alone                  moe(ids, mask, force="common")
    uniform average of all experts       moe(ids, mask, force=moe.names)     (± common as above)
      ... of their hidden states         moe(ids, mask, force=moe.names, mix="hidden")
    language + Python pairs              moe(ids, mask, force=["fr", "py"], mix="hidden")   (PLE: "probs")
    top-2 mixing                         moe(ids, mask, mode="topk", k=2)
Parameter counts for a row: `moe.active_params(<same options>)` (per sequence) and `moe.total_params()`.

An expert bank is any module with `names`, `has_common`, `combines_common`, `shares_head`, `n_positions`,
`vocab_size`, `logits(name, ids, mask, with_common, last=False, cache=None, positions=None)` (`last`: the
last position's only; `cache`: a dict kept between decoding steps, where the experts that run keep their
keys and values; `positions`: (b, T) position ids, for left-padded rows) and `active_params(names,
with_common)` (and, where `shares_head`, `hidden_rows(groups, ids, mask, with_common, cache=None,
positions=None)`, each group's last hidden states with the shared parts run once over the batch, and
`head(h)`): `PLEExperts` here (whole HF models) and `JEETModel` in jeet.py (stacks over shared parts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mome_ray.errors import MomeError
from mome_ray.inference import hidden, linear_t, supports
from mome_ray.jeet import COMMON
from mome_ray.models import kv_cache, n_params
from mome_ray.training import lm_loss

UNKNOWN = -1  # Routing.index of a sequence the router could not place
MIXES = ("probs", "hidden")  # how several experts' outputs are combined: distributions or last hidden states


@dataclass
class Routing:
    """Per-sequence routing decision: index (B,) into the experts (−1 = unknown), probs (B, E)."""

    index: torch.Tensor
    probs: torch.Tensor

    @classmethod
    def onehot(cls, index: torch.Tensor, n_experts: int) -> Routing:
        """Routing from known labels, e.g. each training sequence's language (JEET training)."""
        return cls(index, F.one_hot(index.clamp(min=0), n_experts).float() * (index >= 0).unsqueeze(1))


Router = Callable[[torch.Tensor, "torch.Tensor | None"], Routing]  # (input_ids, attention_mask) -> Routing


def decide(labels: Sequence[str], probs, names: Sequence[str], unknown_below: float = 0.0) -> Routing:
    """A text classifier's answer as a `Routing`: `labels` name the columns of the (N, C) `probs`.

    A sequence whose most probable class is not one of `names` (e.g. an `unknown` class), or whose top
    probability is 0 or below `unknown_below` (the classifier's confidence threshold), is unknown (−1), as
    the router itself says (`router.model.top_labels`); where it then goes is `fallback`'s rule. Every expert
    must be one of the classes. The grid (`text_router`) and the Serve ingress both route through here."""
    from mome_ray.router.model import top_labels

    labels, names = list(labels), list(names)
    missing = [n for n in names if n not in labels]
    if missing:
        raise MomeError(f"the router has no class for expert(s) {missing} (its classes: {labels}); "
                        f"retrain the router on every expert's language")
    index = torch.tensor([names.index(c) if c in names else UNKNOWN for c in top_labels(labels, probs, unknown_below)])
    cols = torch.tensor([labels.index(n) for n in names])
    return Routing(index, torch.as_tensor(probs, dtype=torch.float32)[:, cols])


def fallback(routing: Routing, n_names: int, has_common: bool) -> torch.Tensor:
    """Where each sequence goes as routed top-1, as an index into the members (names, then common):
    its expert, or for an unknown one the common expert when there is one, else the most probable expert."""
    unknown = routing.index == UNKNOWN
    other = torch.full_like(routing.index, n_names) if has_common else routing.probs.argmax(1)
    return torch.where(unknown, other, routing.index)


def text_router(classifier: Any, tokenizer: Any, names: Sequence[str]) -> Router:
    """Adapt a text classifier to a `Router`: decode each sequence's ids with the tokenizer and classify it
    (`classifier.predict_proba(texts)` -> (labels, probs); its `unknown_below`, if any: see `decide`)."""

    def route(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Routing:
        rows = input_ids.tolist() if attention_mask is None else [
            [t for t, keep in zip(ids, mask) if keep] for ids, mask in zip(input_ids.tolist(), attention_mask.tolist())]
        labels, probs = classifier.predict_proba(tokenizer.batch_decode(rows))
        r = decide(labels, probs, names, getattr(classifier, "unknown_below", 0.0))
        return Routing(r.index.to(input_ids.device), r.probs.to(input_ids.device))

    return route


# --- PLE: every expert a whole HF causal LM


class PLEExperts(nn.Module):
    """Pre-trained Language Experts: one whole model per language (+ an optional `common` model)."""

    combines_common = False  # whole models have no shared head: a common model is a fallback, not a mix
    shares_head = False  # ... nor can their hidden states be averaged: only their distributions (mix="probs")

    def __init__(self, models: dict[str, nn.Module]):
        super().__init__()
        if not models:
            raise MomeError("PLE needs at least one expert model")
        self.models = nn.ModuleDict()
        for name, model in models.items():
            self.add(name, model)

    def add(self, name: str, model: nn.Module) -> None:
        """Add an expert; the others are untouched (their outputs stay bit-identical)."""
        if name in self.models:
            raise MomeError(f"PLE already has an expert '{name}'")
        if self.models and model.config.vocab_size != self.vocab_size:
            raise MomeError(f"expert '{name}' has a vocabulary of {model.config.vocab_size} but the other experts "
                            f"have {self.vocab_size}; distil every expert with the run's tokenizer")
        self.models[name] = model

    @property
    def names(self) -> list[str]:
        return [n for n in self.models if n != COMMON]

    @property
    def has_common(self) -> bool:
        return COMMON in self.models

    @property
    def n_positions(self) -> int:
        return min(m.config.n_positions for m in self.models.values())

    @property
    def vocab_size(self) -> int:
        return next(iter(self.models.values())).config.vocab_size

    def logits(self, name: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               with_common: bool, last: bool = False, cache: dict | None = None,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        if with_common:
            raise MomeError("PLE experts are whole models and cannot be averaged with the common expert; "
                            "that is MoE-CE (a JEETModel with common=True)")
        model = self.models[name]
        past = kv_cache(cache, name, model.config)
        if not model.training and supports(model.config):  # the same arithmetic without HF's per-call machinery
            t = model.transformer
            h = hidden(t.wte, t.wpe, t.h, t.ln_f, input_ids, attention_mask, past, positions)
            return linear_t(h[:, -1:] if last else h, model.lm_head.weight)
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, past_key_values=past,
                     use_cache=past is not None, logits_to_keep=int(last)).logits

    def active_params(self, names: list[str], with_common: bool) -> int:
        return sum(n_params(self.models[n]) for n in set(names))


def load_ple(dirs: dict[str, Path]) -> PLEExperts:
    """PLE from saved HF models, e.g. `{lang: run/experts/<lang>}` (+ `"common": ...`)."""
    from transformers import AutoModelForCausalLM

    models = {}
    for name, d in dirs.items():
        if not (Path(d) / "config.json").is_file():
            raise MomeError(f"no model for expert '{name}' in '{d}' (config.json missing); distil it first")
        models[name] = AutoModelForCausalLM.from_pretrained(str(d))
    return PLEExperts(models)


# --- the mixture


@dataclass
class MoEOutput:
    logits: torch.Tensor  # (B, T, V); log-probabilities when experts' distributions were mixed
    loss: torch.Tensor | None  # next-token cross-entropy when labels were given (−100 = ignore)
    experts: list[tuple[str, ...]]  # per sequence, the experts that ran (the common one included)
    selected: list[dict[str, float]]  # per sequence, the members mixed (one when routed top-1) and their weights


@dataclass
class Scores:
    logprobs: torch.Tensor  # (B, T−1): log p(token t+1 | ≤ t); 0 where the target is padding
    experts: list[tuple[str, ...]]
    selected: list[dict[str, float]]


@dataclass
class Plan:
    weights: torch.Tensor  # (B, M) over members = names (+ common); a one-hot row is hard routing
    mix: str | None  # "probs" | "hidden": how rows with several members combine them (None: one member per row)
    common: bool  # average the common stack in (MoE-CE)


class MoE(nn.Module):
    """Per-sequence routing over an expert bank (`PLEExperts` or `JEETModel`)."""

    def __init__(self, experts: nn.Module, router: Router | None = None):
        super().__init__()
        self.experts = experts
        self.router = router

    @property
    def names(self) -> list[str]:
        return self.experts.names

    @property
    def members(self) -> list[str]:
        """Everything that can run: the language experts, then the common expert if there is one."""
        return self.names + ([COMMON] if self.experts.has_common else [])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, *, routing: Routing | None = None,
                force: str | Sequence[str] | None = None, mode: str = "top1", k: int = 2,
                common: bool | None = None, mix: str = "probs") -> MoEOutput:
        plan = self.plan(input_ids, attention_mask, routing, force, mode, k, common, mix)
        logits = self.run(input_ids, attention_mask, plan)
        loss = lm_loss(logits, labels) if labels is not None else None
        return MoEOutput(logits, loss, self._ran(plan), self.selected_by(plan))

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **select) -> Scores:
        """Per-token log-probabilities of the next token; `select`: forward's routing options."""
        out = self(input_ids, attention_mask, **select)
        logprobs = F.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        if attention_mask is not None:
            logprobs = logprobs * attention_mask[:, 1:]
        return Scores(logprobs, out.experts, out.selected)

    def selected(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **select) -> list[dict[str, float]]:
        """Per sequence, the members a call with these options mixes (one when routed top-1), with weights."""
        return self.selected_by(self.plan(input_ids, attention_mask, select.pop("routing", None), **select))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0, eos_id: int | None = None, **select) -> torch.Tensor:
        """Continue equal-length prompts (B, T) -> (B, T + n): `decode`'s tokens appended."""
        ids = input_ids
        for nxt in self.decode(input_ids, max_new_tokens, temperature, top_p, seed, eos_id, **select):
            ids = torch.cat([ids, nxt[:, None]], 1)
        return ids

    @torch.no_grad()
    def decode(self, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 1.0,
               top_p: float = 1.0, seed: int = 0, eos_id: int | None = None, **select) -> Iterator[torch.Tensor]:
        """Each step's next token (B,) for equal-length prompts (B, T). Routing is decided once, on the prompt.

        The rows decode together as the requests of a served batch do (`decoding.Decoder`: a KV cache per
        expert that runs, a sliding window past `n_positions`). Temperature 0 is greedy; otherwise nucleus
        sampling, row i from a generator seeded with `seed + i`, so a seed gives the same text alone or in a
        batch. A row that emitted `eos_id` is padded with it; decoding stops when all have. Call `moe.eval()`
        first (dropout).
        """
        from mome_ray.decoding import Decoder, GenRequest

        if input_ids.ndim != 2 or input_ids.numel() == 0:
            raise MomeError(f"decode needs a non-empty (B, T) batch of prompts, got shape {tuple(input_ids.shape)}")
        if max_new_tokens <= 0:
            return
        routing = select.pop("routing", None)
        decoder = Decoder(self, max_batch=len(input_ids))
        seqs = [decoder.add(GenRequest(row, max_new_tokens, temperature, top_p, seed + i, eos_id), **select,
                            **({"routing": Routing(routing.index[i: i + 1], routing.probs[i: i + 1])} if routing else {}))
                for i, row in enumerate(input_ids.tolist())]
        pad = eos_id if eos_id is not None else 0  # only rows that emitted eos are done early
        while decoder.busy:
            made = {id(seq): token for seq, token in decoder.step()}
            yield torch.tensor([made.get(id(s), pad) for s in seqs], device=input_ids.device)

    def active_params(self, force: str | Sequence[str] | None = None, mode: str = "top1", k: int = 2,
                      common: bool | None = None) -> int:
        """Parameters one sequence runs through under these options (routed: the largest choice)."""
        common = self._common(common)
        if force is not None:
            return self.experts.active_params(self._forced(force), common)
        picks = [[n] for n in self.members] if mode == "top1" else [
            sorted(self.names, key=lambda n: -self.experts.active_params([n], False))[:k]]
        return max(self.experts.active_params(p, common) for p in picks)

    def total_params(self) -> int:
        return n_params(self.experts)

    # --- routing plan: which members run on which rows, with which weight

    def plan(self, input_ids, attention_mask, routing: Routing | None, force=None, mode: str = "top1",
             k: int = 2, common: bool | None = None, mix: str = "probs") -> Plan:
        if input_ids.ndim != 2 or input_ids.numel() == 0:
            raise MomeError(f"MoE needs a non-empty (B, T) batch of token ids, got shape {tuple(input_ids.shape)}")
        self._check_mix(mix)
        common, n = self._common(common), len(input_ids)
        weights = torch.zeros(n, len(self.members), device=input_ids.device)
        if force is not None:
            if routing is not None or mode != "top1":
                raise MomeError("pass either force= or routing=/mode=, not both")
            forced = self._forced(force)
            weights[:, [self.members.index(f) for f in forced]] = 1 / len(forced)
            return Plan(weights, None if isinstance(force, str) else mix, common)
        if mode not in ("top1", "topk"):
            raise MomeError(f"unknown MoE mode '{mode}'; use 'top1' or 'topk'")
        routing = routing if routing is not None else self._route(input_ids, attention_mask)
        if routing.probs.shape != (n, len(self.names)) or routing.index.shape != (n,) \
                or int(routing.index.min()) < UNKNOWN or int(routing.index.max()) >= len(self.names):
            raise MomeError(f"routing has index {tuple(routing.index.shape)} / probs {tuple(routing.probs.shape)}, "
                            f"expected ({n},) / {(n, len(self.names))} for experts {self.names}; "
                            f"retrain the router on exactly these experts")
        routing = Routing(routing.index.to(weights.device), routing.probs.to(weights.device))
        unknown = routing.index == UNKNOWN
        if mode == "top1":
            weights[torch.arange(n), routing.index.clamp(min=0)] = 1.0  # unknown rows: set below
        else:
            if not 1 <= k <= len(self.names):
                raise MomeError(f"top-k needs 1 <= k <= {len(self.names)} (the number of experts), got {k}")
            top = routing.probs.float().topk(k, dim=1)
            weights.scatter_(1, top.indices, top.values / top.values.sum(1, keepdim=True).clamp(min=1e-12))
        to = fallback(routing, len(self.names), self.experts.has_common)
        weights[unknown] = F.one_hot(to[unknown], len(self.members)).float()
        return Plan(weights, mix if mode == "topk" else None, common)

    def _route(self, input_ids, attention_mask) -> Routing:
        if self.router is None:
            raise MomeError("this MoE has no router: pass routing=... or force=<expert>")
        return self.router(input_ids, attention_mask)

    def _forced(self, force: str | Sequence[str]) -> list[str]:
        forced = [force] if isinstance(force, str) else list(force)
        unknown = [f for f in forced if f not in self.members]
        if unknown or not forced:
            raise MomeError(f"no expert {unknown or forced} in this MoE; experts: {self.members}")
        return forced

    def _check_mix(self, mix: str) -> None:
        if mix not in MIXES:
            raise MomeError(f"unknown MoE mix '{mix}'; use one of {list(MIXES)}")
        if mix == "hidden" and not self.experts.shares_head:
            raise MomeError("mix='hidden' averages last hidden states before a shared head, but these experts are "
                            "whole models with heads of their own (PLE); mix their distributions with mix='probs'")

    def _common(self, common: bool | None) -> bool:
        return self.experts.combines_common if common is None else common

    def selected_by(self, plan: Plan) -> list[dict[str, float]]:
        return [{self.members[m]: round(float(row[m]), 6) for m in row.nonzero().flatten().tolist()}
                for row in plan.weights.cpu()]

    def _ran(self, plan: Plan) -> list[tuple[str, ...]]:
        extra = (COMMON,) if plan.common else ()
        return [tuple(dict.fromkeys([self.members[m] for m in row.nonzero().flatten().tolist()] + list(extra)))
                for row in plan.weights.cpu()]  # one device sync, not one per row

    # --- running the plan: each member once on its group of rows

    def _groups(self, fn, input_ids, attention_mask, positions, plan: Plan, **kwargs):
        """(member index, rows, fn(name, ids[rows], mask[rows], common)) for each member that runs on some rows."""
        for m, name in enumerate(self.members):
            rows = plan.weights[:, m].nonzero().flatten()
            if len(rows):
                mask = attention_mask[rows] if attention_mask is not None else None
                pos = {"positions": positions[rows]} if positions is not None else {}
                yield m, rows, fn(name, input_ids[rows], mask, plan.common, **pos, **kwargs)

    def _states(self, input_ids, attention_mask, plan: Plan, last: bool, cache: dict | None,
                positions: torch.Tensor | None) -> tuple[list, list[torch.Tensor]]:
        """([(member index, rows)], each one's last hidden states (b, T, C), or (b, 1, C) with `last`) from one
        `hidden_rows` call: the common stack runs once over the batch, not once per member."""
        groups = [(m, rows) for m in range(len(self.members)) if len(rows := plan.weights[:, m].nonzero().flatten())]
        states = self.experts.hidden_rows([(self.members[m], rows) for m, rows in groups], input_ids, attention_mask,
                                          plan.common, cache, positions)
        return groups, [h[:, -1:] if last else h for h in states]

    def run(self, input_ids, attention_mask, plan: Plan, last: bool = False, cache: dict | None = None,
            positions: torch.Tensor | None = None):
        """(B, T, V) logits, or (B, 1, V) for the last position only with `last` (decoding: the head over
        every position would cost more than the blocks). With `cache` (decoding: each stack's cache holds its
        rows, in batch order), `input_ids` are the tokens after those cached, `attention_mask` covers the cached
        tokens and these, and `positions` (B, T) are theirs (left-padded rows: see decoding.py).
        Experts that share the head (JEET, MoE-CE) run it once over the batch unless their distributions mix."""
        if self.experts.shares_head:
            groups, states = self._states(input_ids, attention_mask, plan, last, cache, positions)
            if plan.mix != "probs":  # Σ_m w_m·h_m per row (top-1: its one member's), then the head once
                h = states[0].new_zeros(len(input_ids), *states[0].shape[1:])
                for (m, rows), state in zip(groups, states):
                    h = h.index_add(0, rows, state * plan.weights[rows, m].to(state.dtype)[:, None, None])
                return self.experts.head(h)
            members = [(m, rows, self.experts.head(state)) for (m, rows), state in zip(groups, states)]
        else:
            members = self._groups(self.experts.logits, input_ids, attention_mask, positions, plan, last=last,
                                   cache=cache)
        order, pieces = [], []
        for m, rows, logits in members:
            if plan.mix == "probs":  # weighted log-probs of this member, logsumexp-ed below
                logits = F.log_softmax(logits.float(), -1) + plan.weights[rows, m].log()[:, None, None]
            order.append(rows)
            pieces.append(logits)
        if plan.mix is None:  # one member per row: scatter the groups back into batch order
            return torch.cat(pieces)[torch.cat(order).argsort()]
        mixed = torch.full((len(input_ids), *pieces[0].shape[1:]), float("-inf"), device=pieces[0].device)
        for rows, logp in zip(order, pieces):
            mixed = mixed.index_put((rows,), torch.logaddexp(mixed[rows], logp))
        return mixed


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """Next token per row from (B, V) logits: greedy at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = F.softmax(logits / temperature, -1)
    sorted_p, idx = probs.sort(-1, descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest prefix whose mass reaches top_p
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=gen)
    return idx.gather(-1, choice).squeeze(-1)


class Routed(nn.Module):
    """An MoE under fixed options, called like an HF model: `Routed(moe, force="fr")(input_ids=ids).logits`.

    `route(ids, mask)` (a `moe.Router`) decides per batch; other keywords go to `MoE.forward` as they are
    (`routing=`, `force=`, `mode=`, `k=`, `common=`, `mix=`). Lets `training.evaluate` and `kd.kd_step`,
    written for HF models, run an MoE.
    """

    def __init__(self, moe: nn.Module, route=None, **select):
        super().__init__()
        self.moe, self.route, self.select = moe, route, select

    def forward(self, input_ids: torch.Tensor):
        routing = {"routing": self.route(input_ids, None)} if self.route is not None else {}
        return self.moe(input_ids, **routing, **self.select)
