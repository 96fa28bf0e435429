"""JEET and MoE-CE: one model, a shared embedding and head, one stack of GPT-2 blocks per language.

JEET (Joint Expert Embedding Training): the token and position embeddings, the final LayerNorm and the LM
head (tied to the token embedding, as in GPT-2) are shared; each language has its own stack of GPT-2
blocks. A sequence goes through its language's stack only, so a training step gives gradients to the
stacks that ran and to the shared parts, never to the others.

MoE-CE: JEET plus a `common` stack that runs for every sequence. Its last hidden state (after the shared
final LayerNorm, like `GPT2Model.last_hidden_state`) is averaged with the selected stack's before the
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
import torch.nn.functional as F
from torch import nn

from mome_ray.errors import MomeError
from mome_ray.models import ModelConfig, build_gpt2

COMMON = "common"  # the name of the always-on expert of MoE-CE
DDP_KWARGS = {"find_unused_parameters": True}  # for DistributedDataParallel / Ray Train's prepare_model


@dataclass
class JEETConfig:
    langs: list[str]  # one stack per language, in routing-column order
    vocab_size: int
    eos_id: int
    pad_id: int
    model: ModelConfig = field(default_factory=ModelConfig)  # the size of each stack (n_layer blocks)
    common: bool = False  # add the always-on common stack: MoE-CE
    gate: bool = False  # MoE-CE only: a learned per-expert scalar instead of the plain mean

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = ModelConfig(**self.model)
        if not self.langs:
            raise MomeError("JEET needs at least one language in 'langs'")
        if len(set(self.langs)) != len(self.langs):
            raise MomeError(f"JEET langs have duplicates: {self.langs}")
        if COMMON in self.langs:
            raise MomeError(f"'{COMMON}' is the name of the common expert, not a language; set common=True")
        if self.gate and not self.common:
            raise MomeError("JEET gate=True needs common=True: the gate weighs an expert against the common stack")


class JEETModel(nn.Module):
    """Shared embedding/LN/head, one block stack per language (+ the common stack of MoE-CE)."""

    def __init__(self, cfg: JEETConfig):
        super().__init__()
        self.cfg = cfg
        template = self._build_lm()
        self.gpt2_config = template.config  # blocks and masks follow it (attention implementation, sizes)
        self.wte, self.wpe = template.transformer.wte, template.transformer.wpe
        self.drop, self.ln_f = template.transformer.drop, template.transformer.ln_f
        members = cfg.langs + ([COMMON] if cfg.common else [])
        # each stack is initialised like a fresh GPT-2 (HF's init, scaled residual projections)
        self.stacks = nn.ModuleDict({m: (template if i == 0 else self._build_lm()).transformer.h
                                     for i, m in enumerate(members)})
        self.gate = nn.Parameter(torch.zeros(len(cfg.langs))) if cfg.gate else None

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
               with_common: bool) -> torch.Tensor:
        """(b, T, V) logits of every sequence of the group through stack `name` (+ the common stack)."""
        return F.linear(self.hidden(name, input_ids, attention_mask, with_common), self.wte.weight)

    def active_params(self, names: list[str], with_common: bool) -> int:
        """Parameters one sequence runs through: the shared parts plus the named stacks."""
        run = set(names) | ({COMMON} if with_common else set())
        shared = sum(p.numel() for n, p in self.named_parameters() if not n.startswith("stacks."))
        return shared + sum(p.numel() for m in run for p in self.stacks[m].parameters())

    # --- the model

    def hidden(self, name: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               with_common: bool) -> torch.Tensor:
        """Last hidden state (b, T, C), after the shared final LayerNorm; mixed with the common stack's."""
        if name not in self.stacks:
            raise MomeError(f"no expert '{name}' in this JEET model; experts: {list(self.stacks)}")
        if with_common and not self.cfg.common:
            raise MomeError("this JEET model has no common expert; build it with common=True (MoE-CE)")
        x, mask, pos = self._embed(input_ids, attention_mask)
        h = self._stack(name, x, mask, pos)
        if not with_common or name == COMMON:
            return h
        h_common = self._stack(COMMON, x, mask, pos)
        if self.gate is None:
            return (h + h_common) / 2  # the paper's plain mean
        g = torch.sigmoid(self.gate[self.cfg.langs.index(name)])
        return (1 - g) * h_common + g * h

    def _embed(self, input_ids, attention_mask):
        from transformers.masking_utils import create_causal_mask

        pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)  # (1, T)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))  # (b, T, C)
        mask = create_causal_mask(config=self.gpt2_config, inputs_embeds=x, attention_mask=attention_mask,
                                  past_key_values=None, position_ids=pos)
        return x, mask, pos

    def _stack(self, name, x, mask, pos):
        for block in self.stacks[name]:
            x = block(x, attention_mask=mask, position_ids=pos)
        return self.ln_f(x)

    def expert_lm(self, name: str):
        """A standalone HF `GPT2LMHeadModel` of one stack with the shared parts (a copy, e.g. to serve)."""
        if name not in self.stacks:
            raise MomeError(f"no expert '{name}' in this JEET model; experts: {list(self.stacks)}")
        lm = self._build_lm()
        shared = {k: v for k, v in self.state_dict().items() if not k.startswith(("stacks.", "gate"))}
        state = {f"transformer.{k}": v for k, v in shared.items()}
        state |= {f"transformer.h.{k}": v for k, v in self.stacks[name].state_dict().items()}
        state["lm_head.weight"] = self.wte.weight.detach()
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
