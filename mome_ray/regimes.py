"""The forgetting study's four regimes: the model each trains, what a stage trains, what answers a language.

    sequential  one GPT-2 (`forgetting.model`), one language after another (the order of `langs`)
    balanced    the same GPT-2, one session of balanced batches (every batch an equal share of each language)
    jeet        a JEET MoE (jeet.py): token + position embeddings, final LayerNorm and tied head shared, one
                stack of `forgetting.jeet_layers` blocks per language; trained in the order of `sequential`,
                stage k through stack k only. The shared parts train in every stage, so an earlier
                language can be forgotten through them. A language is answered through the router.
    separate    one whole GPT-2 per language (each `forgetting.model`: len(langs) x the parameters), stage k
                trains expert k only, each language is answered by its own expert. Nothing an earlier stage
                trained is touched again: its zero forgetting holds by construction (a reference, not a finding).

    model = build("jeet", model_cfg, jeet_layers=1, langs=langs, vocab_size=V, eos_id=e, pad_id=p)
    lm_train_step(trained(model, "jeet", ["fr"]), opt, sched, ids, ...)       # stage "fr": stack fr + shared parts
    losses = language_losses(model, "jeet", blocks, route, device, 16, False)   # {lang: mean next-token loss}
    total, active = param_counts(model, "jeet")                                 # active: per sequence

Pure torch, no Ray.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch import nn

from mome_ray.jeet import DDP_KWARGS, JEETConfig, JEETModel
from mome_ray.models import ModelConfig, build_gpt2, n_params
from mome_ray.moe import MoE, PLEExperts, Routed, Router
from mome_ray.training import evaluate

REGIMES = ("sequential", "balanced", "jeet", "separate")
NAMES = {  # how tables and plots name each regime
    "sequential": "sequential",
    "balanced": "balanced",
    "jeet": "JEET (shared parts)",
    "separate": "separate experts (forgetting impossible by construction)",
}
WHAT = {
    "sequential": "one model, one language after another",
    "balanced": "one model, one session of balanced batches",
    "jeet": "shared embeddings, final LayerNorm and head + one stack per language; stage k trains stack k "
            "and the shared parts",
    "separate": "one whole model per language, stage k trains model k only",
}
BY_CONSTRUCTION = ("separate",)  # zero forgetting by construction: nothing trained earlier is touched again
MIXTURES = ("jeet", "separate")  # an MoE: a stage trains one expert, one expert answers a sequence


def stage_langs(regime: str, langs: list[str]) -> list[list[str]]:
    """The languages of each stage's batches: one per stage, or (balanced) all of them in every stage."""
    return [list(langs)] * len(langs) if regime == "balanced" else [[l] for l in langs]


def build(regime: str, model: ModelConfig, jeet_layers: int, langs: list[str], vocab_size: int, eos_id: int,
          pad_id: int) -> nn.Module:
    """A fresh model of the regime: a GPT-2, or an `MoE` over JEET stacks or over whole GPT-2s."""
    if regime == "jeet":
        stack = dataclasses.replace(model, n_layer=jeet_layers)
        return MoE(JEETModel(JEETConfig(list(langs), vocab_size, eos_id, pad_id, stack)))
    if regime == "separate":
        return MoE(PLEExperts({l: build_gpt2(model, vocab_size, eos_id, pad_id) for l in langs}))
    return build_gpt2(model, vocab_size, eos_id, pad_id)


def trained(model: nn.Module, regime: str, stage: list[str]) -> nn.Module:
    """What a stage's training step runs: the whole model, or (an MoE) the stage language's expert."""
    return Routed(model, force=stage[0]) if regime in MIXTURES else model


def answerer(model: nn.Module, regime: str, lang: str, route: Callable[[str], Router] | None) -> nn.Module:
    """What answers `lang` in evaluation: the model; JEET through `route(lang)` (the router, or an oracle);
    separate experts by the language's own expert."""
    if regime == "jeet":
        return Routed(model, route(lang))
    if regime == "separate":
        return Routed(model, force=lang)
    return model


def routing_of(regime: str, jeet_routing: str) -> str:
    """How a regime's evaluation picks the expert: "-" (one model), "router" or "oracle" (the true language)."""
    return jeet_routing if regime == "jeet" else "oracle" if regime == "separate" else "-"


def language_losses(model: nn.Module, regime: str, blocks: dict[str, np.ndarray],
                    route: Callable[[str], Router] | None, device, batch_size: int, bf16: bool) -> dict[str, float]:
    """Mean next-token loss per language of a regime's model, each language answered as `answerer` says."""
    return {l: evaluate(answerer(model, regime, l, route), {l: b}, device, batch_size, bf16)[l]
            for l, b in blocks.items()}


def param_counts(model: nn.Module, regime: str) -> tuple[int, int]:
    """(total, active per sequence): an MoE runs one expert per sequence (+ JEET's shared parts)."""
    total = n_params(model)
    return total, (model.active_params() if regime in MIXTURES else total)


def checkpoint_io(regime: str, build_model: Callable[[], nn.Module]) -> dict:
    """How a regime's checkpoint folder (and exported artifact) is read and written: `worker.start_run`'s
    load / save / ddp_kwargs. An MoE runs one expert per step, so DDP must tolerate unused parameters."""
    if regime == "jeet":
        return {"load": lambda d: MoE(JEETModel.load(d)), "save": lambda moe, d: moe.experts.save(d),
                "ddp_kwargs": DDP_KWARGS}
    if regime == "separate":  # whole GPT-2s with tied heads: safetensors' save_model handles the shared storage
        from safetensors.torch import load_model, save_model

        def load(d: Path) -> nn.Module:
            model = build_model()
            load_model(model, str(Path(d) / "model.safetensors"))
            return model

        return {"load": load, "save": lambda m, d: save_model(m, str(Path(d) / "model.safetensors")),
                "ddp_kwargs": DDP_KWARGS}
    from transformers import AutoModelForCausalLM

    return {"load": lambda d: AutoModelForCausalLM.from_pretrained(str(d))}  # saved with save_pretrained


def load(regime: str, model_dir: Path, build_model: Callable[[], nn.Module]) -> nn.Module:
    """A regime's trained model from its artifact folder (RUN_DIR/forgetting/<regime>/)."""
    return checkpoint_io(regime, build_model)["load"](Path(model_dir))

