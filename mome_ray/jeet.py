"""JEET and MoE-CE: one model, a shared embedding and head, one stack of GPT-2 blocks per language.

JEET (Joint Expert Embedding Training): the token and position embeddings, the final LayerNorm and the LM
head (tied to the token embedding, as in GPT-2) are shared; each language has its own stack of GPT-2
blocks. A sequence goes through its language's stack only, so a training step gives gradients to the
stacks that ran and to the shared parts, never to the others. `JEETParts` moves parts to the experts as the
paper's public code has them: a position embedding per expert (`expert_wpe`), a final LayerNorm per expert
(`expert_ln_f`), and a head of its own with a bias, untied from the token embedding (`untied_head`; still
one head, shared by every expert). All off by default.

MoE-CE: JEET plus a `common` stack that runs for every sequence. Its last hidden state (after the final
LayerNorm, like `GPT2Model.last_hidden_state`) is averaged with the selected stack's before the
head: the paper's plain mean, or with `gate=True` a learned scalar per expert,
h = (1 − σ(g_e))·h_common + σ(g_e)·h_e, that starts at the plain mean (g_e = 0).

    cfg = JEETConfig(langs=["en", "fr", "de", "py"], vocab_size=8000, eos_id=0, pad_id=1,
                     model=ModelConfig(n_layer=3, n_embd=256, n_head=4), common=True)
    model = JEETModel(cfg)
    logits = model.logits("fr", ids, attention_mask, with_common=True)   # (B, T, V)
    moe = MoE(model, router)            # per-sequence routing, top-k, score, generate: see moe.py
    model.save("run/moe/jeet"); JEETModel.load("run/moe/jeet")            # safetensors + config.json

Training (KD): route each sequence by its known language and call the MoE, so DDP sees the forward:
    moe = MoE(JEETModel(cfg))
    out = moe(ids, labels=ids, routing=Routing.onehot(lang_index, len(cfg.langs)))
    loss = alpha * out.loss + beta * reverse_kl(out.logits, teacher_logits)

DDP: a stack that no sequence of a rank's batch selected gets no gradient on that rank, and
`DistributedDataParallel` then fails at the next step ("Expected to have finished reduction...") or
waits. Wrap the `MoE` (not the `JEETModel`, which has no `forward`) with `DDP_KWARGS`
(`find_unused_parameters=True`); in Ray Train:
    moe = ray.train.torch.prepare_model(MoE(model), parallel_strategy_kwargs=DDP_KWARGS)
DDP then all-reduces a zero gradient for the stack from the ranks that skipped it, so every rank
applies the same averaged gradient. (Under DDP a skipped stack may hold a zero gradient rather than
none, so AdamW's momentum and weight decay can still move it; single-process steps leave unselected
stacks bit-identical.) tests/test_moe.py runs two gloo ranks with a stack unused on each.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from mome_ray.errors import MomeError
from mome_ray.inference import hidden, linear_t, next_positions
from mome_ray.models import ModelConfig, build_gpt2, kv_cache

COMMON = "common"  # the name of the always-on expert of MoE-CE
DDP_KWARGS = {"find_unused_parameters": True}  # for DistributedDataParallel / Ray Train's prepare_model


@dataclass
class JEETParts:
    """Which parts besides the block stacks each expert owns (the paper's public code: all three on)."""

    expert_wpe: bool = False  # a position embedding per expert (off: one shared by every expert)
    expert_ln_f: bool = False  # a final LayerNorm per expert (off: one shared)
    untied_head: bool = False  # the shared LM head has its own weight and a bias (off: tied to wte, no bias)


@dataclass
class JEETConfig:
    langs: list[str]  # one stack per language, in routing-column order
    vocab_size: int
    eos_id: int
    pad_id: int
    model: ModelConfig = field(default_factory=ModelConfig)  # the size of each stack (n_layer blocks)
    common: bool = False  # add the always-on common stack: MoE-CE
    gate: bool = False  # MoE-CE only: a learned per-expert scalar instead of the plain mean
    parts: JEETParts = field(default_factory=JEETParts)  # shared or per-expert position embedding, LN, head

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = ModelConfig(**self.model)
        if isinstance(self.parts, dict):
            self.parts = JEETParts(**self.parts)
        if not self.langs:
            raise MomeError("JEET needs at least one language in 'langs'")
        if len(set(self.langs)) != len(self.langs):
            raise MomeError(f"JEET langs have duplicates: {self.langs}")
        if COMMON in self.langs:
            raise MomeError(f"'{COMMON}' is the name of the common expert, not a language; set common=True")
        if self.gate and not self.common:
            raise MomeError("JEET gate=True needs common=True: the gate weighs an expert against the common stack")


class JEETModel(nn.Module):
    """Shared embedding/LN/head, one block stack per language (+ the common stack of MoE-CE).

    A part an expert owns (`cfg.parts`) is an `nn.ModuleDict` by member name (`wpe.fr.weight`); a shared one
    is the module itself (`wpe.weight`), as in GPT-2. The untied head is `lm_head` (weight and bias)."""

    shares_head = True  # every expert's last hidden state goes through one head: hidden states can be averaged

    def __init__(self, cfg: JEETConfig):
        super().__init__()
        self.cfg = cfg
        template = self._build_lm()
        self.gpt2_config = template.config  # blocks and masks follow it (attention implementation, sizes)
        members = cfg.langs + ([COMMON] if cfg.common else [])
        # each stack (and each owned part) is initialised like a fresh GPT-2 (HF's init, scaled residual projections)
        lms = {m: (template if i == 0 else self._build_lm()).transformer for i, m in enumerate(members)}
        self.wte, self.drop = template.transformer.wte, template.transformer.drop
        self.wpe = nn.ModuleDict({m: t.wpe for m, t in lms.items()}) if cfg.parts.expert_wpe else lms[members[0]].wpe
        self.ln_f = nn.ModuleDict({m: t.ln_f for m, t in lms.items()}) if cfg.parts.expert_ln_f else lms[members[0]].ln_f
        self.stacks = nn.ModuleDict({m: t.h for m, t in lms.items()})
        self.gate = nn.Parameter(torch.zeros(len(cfg.langs))) if cfg.gate else None
        self.lm_head = self._untied_head() if cfg.parts.untied_head else None

    def _untied_head(self) -> nn.Linear:
        head = nn.Linear(self.cfg.model.n_embd, self.cfg.vocab_size, bias=True)
        nn.init.normal_(head.weight, std=self.gpt2_config.initializer_range)  # GPT-2's init for linear layers
        nn.init.zeros_(head.bias)
        return head

    def _build_lm(self):
        return build_gpt2(self.cfg.model, self.cfg.vocab_size, self.cfg.eos_id, self.cfg.pad_id)

    # --- the expert-bank interface MoE (moe.py) calls

    @property
    def names(self) -> list[str]:
        return list(self.cfg.langs)

    @property
    def has_common(self) -> bool:
        return self.cfg.common

    @property
    def combines_common(self) -> bool:
        return self.cfg.common

    @property
    def n_positions(self) -> int:
        return self.cfg.model.n_positions

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def logits(self, name: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               with_common: bool, last: bool = False, cache: dict | None = None,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        """(b, T, V) logits of every sequence of the group through stack `name` (+ the common stack); (b, 1, V)
        for the last position only with `last`. `cache`, `positions`: see `hidden`."""
        h = self.hidden(name, input_ids, attention_mask, with_common, cache, positions)
        return self.head(h[:, -1:] if last else h)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The shared LM head: (b, T, C) last hidden states -> (b, T, V) logits."""
        if self.lm_head is not None:
            return linear_t(h, self.lm_head.weight, self.lm_head.bias)
        return linear_t(h, self.wte.weight)

    def active_params(self, names: list[str], with_common: bool) -> int:
        """Parameters one sequence runs through: the shared parts plus the named stacks and their own parts."""
        run = set(names) | ({COMMON} if with_common else set())
        owned = [(f"{part}.", m) for part in ("stacks", "wpe", "ln_f") for m in self.stacks
                 if isinstance(getattr(self, part), nn.ModuleDict)]  # (prefix, member) of the experts' own parts
        count = 0
        for n, p in self.named_parameters():
            owner = next((m for prefix, m in owned if n.startswith(f"{prefix}{m}.")), None)
            count += p.numel() if owner is None or owner in run else 0
        return count

    # --- the model

    def hidden(self, name: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               with_common: bool, cache: dict | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden state (b, T, C), after the shared final LayerNorm; mixed with the common stack's.

        With `cache` (a dict the caller keeps between calls on the same rows, e.g. decoding): each stack that
        runs keeps its keys and values there, and `input_ids` are the tokens after those already cached
        (`attention_mask` then covers both). `positions` (b, T): the tokens' positions (default: they follow
        the cached ones), for rows padded on the left."""
        rows = torch.arange(len(input_ids), device=input_ids.device)
        return self.hidden_rows([(name, rows)], input_ids, attention_mask, with_common, cache, positions)[0]

    def hidden_rows(self, groups: list[tuple[str, torch.Tensor]], input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None, with_common: bool, cache: dict | None = None,
                    positions: torch.Tensor | None = None) -> list[torch.Tensor]:
        """`hidden` of each group (name, rows: indices into the batch) of one batch, the common stack run once
        over all the batch's rows (not once per group) when `with_common`. In `cache`, each stack keeps its
        own rows' keys and values: a language stack its groups', the common stack every row's."""
        unknown = [name for name, _ in groups if name not in self.stacks]
        if unknown:
            raise MomeError(f"no expert {unknown} in this JEET model; experts: {list(self.stacks)}")
        if with_common and not self.cfg.common:
            raise MomeError("this JEET model has no common expert; build it with common=True (MoE-CE)")
        shared = self._stack(COMMON, input_ids, attention_mask, cache, positions) if with_common else None
        out = []
        for name, rows in groups:
            if shared is not None and name == COMMON:
                out.append(shared[rows])
                continue
            every = len(rows) == len(input_ids)  # rows = the whole batch, in order: no copies
            mask = attention_mask if every or attention_mask is None else attention_mask[rows]
            pos = positions if every or positions is None else positions[rows]
            h = self._stack(name, input_ids if every else input_ids[rows], mask, cache, pos)
            out.append(h if shared is None else self._with_common(name, h, shared if every else shared[rows]))
        return out

    def _with_common(self, name: str, h: torch.Tensor, h_common: torch.Tensor) -> torch.Tensor:
        """Expert `name`'s hidden states mixed with the common stack's on the same rows: the paper's plain
        mean, or the learned per-language gate."""
        if self.gate is None:
            return (h + h_common) / 2
        g = torch.sigmoid(self.gate[self.cfg.langs.index(name)])
        return (1 - g) * h_common + g * h

    def _part(self, part: str, name: str) -> nn.Module:
        """Member `name`'s own `wpe` / `ln_f`, or the shared one."""
        module = getattr(self, part)
        return module[name] if isinstance(module, nn.ModuleDict) else module

    def _stack(self, name, input_ids, attention_mask, cache: dict | None = None,
               positions: torch.Tensor | None = None):
        """Embed, run stack `name`, final LayerNorm: (b, T) ids -> (b, T, C); with `cache`, after the tokens
        cached under `name` (their positions continue theirs unless `positions` says otherwise)."""
        past = kv_cache(cache, name, self.gpt2_config)
        if not self.training:  # the same arithmetic without HF's per-call machinery
            return hidden(self.wte, self._part("wpe", name), self.stacks[name], self._part("ln_f", name), input_ids,
                          attention_mask, past, positions)
        from transformers.masking_utils import create_causal_mask

        pos = positions if positions is not None else next_positions(past, input_ids)
        x = self.drop(self.wte(input_ids) + self._part("wpe", name)(pos))  # (b, T, C)
        mask = create_causal_mask(config=self.gpt2_config, inputs_embeds=x, attention_mask=attention_mask,
                                  past_key_values=past, position_ids=pos)
        for block in self.stacks[name]:
            x = block(x, past_key_values=past, attention_mask=mask, position_ids=pos, use_cache=past is not None)
        return self._part("ln_f", name)(x)

    def expert_lm(self, name: str):
        """A standalone HF `GPT2LMHeadModel` of one stack with the shared parts (a copy, e.g. to serve)."""
        if name not in self.stacks:
            raise MomeError(f"no expert '{name}' in this JEET model; experts: {list(self.stacks)}")
        lm = self._build_lm()
        state = {"transformer.wte.weight": self.wte.weight.detach()}
        for part in ("wpe", "ln_f", "h"):
            module = self.stacks[name] if part == "h" else self._part(part, name)
            state |= {f"transformer.{part}.{k}": v for k, v in module.state_dict().items()}
        if self.lm_head is None:
            state["lm_head.weight"] = self.wte.weight.detach()
        else:  # untied, with a bias: the HF model gets a head of the same shape (GPT-2's has no bias)
            lm.config.tie_word_embeddings = False
            lm.lm_head = nn.Linear(self.cfg.model.n_embd, self.cfg.vocab_size, bias=True)
            state |= {f"lm_head.{k}": v for k, v in self.lm_head.state_dict().items()}
        lm.load_state_dict(state)
        return lm.to(self.wte.weight.device)

    # --- artifacts: safetensors + JSON, no pickle

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(asdict(self.cfg), indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / "model.safetensors"))

    @classmethod
    def load(cls, path: Path) -> JEETModel:
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            raise MomeError(f"no JEET model in '{path}' (config.json or model.safetensors missing); train it first")
        model = cls(JEETConfig(**json.loads((path / "config.json").read_text())))
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        return model
