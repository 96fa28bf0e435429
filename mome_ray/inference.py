"""GPT-2 blocks for inference, over the weights of HF's `GPT2Block`s, without HF's per-call machinery.

Decoding a few rows is bound by Python, not arithmetic: an HF block call (hooks, output tuples, the
attention-interface dispatch, a mask built per model call) costs several times its matmuls. `run_blocks` runs
the same weights with the same arithmetic as HF's eager/SDPA GPT-2 (layer norm, fused QKV, scaled dot-product
attention, GELU, residuals) in a few tensor calls, and keeps keys and values in the same `DynamicCache`, so a
cache is interchangeable between the two. Both expert banks (`moe.PLEExperts`, `jeet.JEETModel`) use it in eval
mode; training (dropout, DDP) keeps HF's modules.

    h = hidden(wte, wpe, blocks, ln_f, ids, attention_mask, cache, positions)   # (B, T, C), after ln_f
    logits = linear_t(h, lm_head_weight)         # the head through a cached transposed weight
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

TANH_GELU = "NewGELUActivation"  # HF's `gelu_new` (GPT-2's): F.gelu(approximate="tanh"), up to rounding, in one call
_TRANSPOSED: dict[int, tuple] = {}  # id(weight) -> ((version, pointer), weight.T)


def supports(config) -> bool:
    """Whether `run_blocks` computes what HF's GPT-2 with this config does (our models' defaults)."""
    return (config.model_type == "gpt2" and config.scale_attn_weights and not config.scale_attn_by_inverse_layer_idx
            and not config.reorder_and_upcast_attn and not config.add_cross_attention)


def hidden(wte, wpe, blocks, ln_f, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, cache=None,
           positions: torch.Tensor | None = None) -> torch.Tensor:
    """A GPT-2 stack's last hidden states (B, T, C) after its final LayerNorm: embed `input_ids` (the tokens after
    those in `cache`; `positions` (B, T) default to following them), run `blocks`, `ln_f`. `attention_mask`
    (B, cached + T) marks real tokens."""
    queries = input_ids.shape[1]
    cached = cache.get_seq_length() if cache is not None else 0
    if positions is None:
        positions = next_positions(cache, input_ids)
    x = run_blocks(blocks, wte(input_ids) + wpe(positions), cache, attention(attention_mask, queries, cached + queries))
    return ln_f(x)


def next_positions(cache, input_ids: torch.Tensor) -> torch.Tensor:
    """(1, T) positions of `input_ids` following the tokens already in `cache` (a `DynamicCache` or None)."""
    start = cache.get_seq_length() if cache is not None else 0
    return torch.arange(start, start + input_ids.shape[1], device=input_ids.device).unsqueeze(0)


def attention(attention_mask: torch.Tensor | None, queries: int, length: int) -> torch.Tensor | None:
    """Which cached-or-new column each new token sees: (B, 1, T, L) bool for `queries` T new tokens after
    `length` − T cached ones, `attention_mask` (B, L) marking real tokens; None where plain causal attention is
    exact (no padding: `run_blocks` then needs no mask). A padding position sees itself, so that no row of
    the attention is empty (SDPA would give NaN there, and a NaN key would poison every row)."""
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    if attention_mask is None and (queries == 1 or queries == length):
        return None  # one new token sees every cached one; no cache: SDPA's is_causal
    cols = torch.arange(length, device=attention_mask.device if attention_mask is not None else None)
    own = cols[length - queries:, None]  # (T, 1): each new token's column
    seen = cols <= own  # (T, L) causal, aligned to the last column
    if attention_mask is not None:
        seen = (attention_mask[:, None, :].bool() & seen) | (cols == own)
    return seen.reshape(-1, 1, queries, length)


def run_blocks(blocks, x: torch.Tensor, cache=None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`blocks` (HF `GPT2Block`s) over x (B, T, C); with `cache` (a `DynamicCache`, one layer per block) the
    new keys and values are appended there; `mask`: `attention`'s."""
    for i, block in enumerate(blocks):
        x = _block(block, x, cache.layers[i] if cache is not None else None, mask)
    return x


def _block(block, x: torch.Tensor, layer, mask: torch.Tensor | None) -> torch.Tensor:
    b, t, c = x.shape
    attn, mlp = block.attn, block.mlp
    h = F.layer_norm(x, (c,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps).view(-1, c)
    qkv = torch.addmm(attn.c_attn.bias, h, attn.c_attn.weight).view(b, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, T, D)
    if layer is not None:
        k, v = layer.update(k, v)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and t > 1)
    x = x + torch.addmm(attn.c_proj.bias, o.transpose(1, 2).reshape(-1, c), attn.c_proj.weight).view(b, t, c)
    h = F.layer_norm(x, (c,), block.ln_2.weight, block.ln_2.bias, block.ln_2.eps).view(-1, c)
    h = torch.addmm(mlp.c_fc.bias, h, mlp.c_fc.weight)
    h = F.gelu(h, approximate="tanh") if type(mlp.act).__name__ == TANH_GELU else mlp.act(h)
    return x + torch.addmm(mlp.c_proj.bias, h, mlp.c_proj.weight).view(b, t, c)


def linear_t(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(h, weight, bias)` through a cached contiguous `weight.T`: for the few rows of a decode step
    an LM head's (C, V) product is about twice as fast on CPU as F.linear's. The copy is remade when the weight
    changes (its version or storage); where autograd records, F.linear itself."""
    if torch.is_grad_enabled():
        return F.linear(h, weight, bias)
    key = (weight._version, weight.data_ptr())
    cached = _TRANSPOSED.get(id(weight))
    if cached is None or cached[0] != key:
        if cached is None:  # the copy goes with the weight
            weakref.finalize(weight, _TRANSPOSED.pop, id(weight), None)
        cached = _TRANSPOSED[id(weight)] = (key, weight.detach().t().contiguous())
    out = h @ cached[1]
    return out if bias is None else out + bias
