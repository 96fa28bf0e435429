"""GPT-2 models built from config, never from a hub.

The artifact of every model stage is a plain `transformers` GPT-2 (`save_pretrained` + safetensors), so
`AutoModelForCausalLM.from_pretrained(RUN_DIR/teacher)` loads it in a fresh process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mome_ray.errors import MomeError


@dataclass
class ModelConfig:
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_positions: int = 128  # context length in tokens; training blocks are this long
    dropout: float = 0.0

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise MomeError(f"model n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


def build_gpt2(cfg: ModelConfig, vocab_size: int, eos_id: int, pad_id: int):
    """A freshly initialised GPT-2 LM. bos/eos come from our tokenizer (GPT2Config's 50256 is out of range)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    return GPT2LMHeadModel(config)


def kv_cache(caches: dict | None, key: str, config):
    """The HF `DynamicCache` kept under `key` in a decoding step's dict of caches (made on first use); None
    when there is no such dict (no caching)."""
    if caches is None:
        return None
    if key not in caches:
        from transformers import DynamicCache

        caches[key] = DynamicCache(config=config)
    return caches[key]


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def load_lm(model_dir, tokenizer_dir):
    """Load a saved causal LM and check that it shares the run's tokenizer vocabulary."""
    from transformers import AutoModelForCausalLM

    from mome_ray.tokenizer import check_vocab

    if not (Path(model_dir) / "config.json").is_file():
        raise MomeError(f"no model in '{model_dir}' (config.json missing); train it first")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    check_vocab(tokenizer_dir, model.config.vocab_size, f"model '{model_dir}'")
    return model
