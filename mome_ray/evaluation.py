"""Per-language validation perplexity of saved models, all on the same blocks, as one table.

    rows = [Row("teacher", {l: run/"teacher" for l in langs}), Row("experts", {l: run/"experts"/l ...})]
    df = perplexity_table(rows, run/"tokenizer", langs, block_size=128, eval_blocks=48)

A row maps each language to the model that answers for it (one model for all, or one per language);
every model reads the same first `eval_blocks` validation blocks of each language, so numbers in a column
compare directly. `mean` is the perplexity of the mean loss over the row's languages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mome_ray.data import eval_blocks as first_blocks
from mome_ray.data import load_blocks
from mome_ray.models import load_lm, n_params
from mome_ray.moe import Routed
from mome_ray.training import TrainConfig, evaluate, perplexity, process_device


@dataclass
class Row:
    label: str
    models: dict[str, Path]  # language -> model directory


def perplexity_table(rows: list[Row], tokenizer_dir: Path, langs: list[str], block_size: int, eval_blocks: int,
                     batch_size: int = 16):
    import pandas as pd

    val = {l: first_blocks(load_blocks(tokenizer_dir, "val", l, block_size), eval_blocks) for l in langs}
    needs: dict[Path, dict[str, None]] = {}  # each model once, on every language any row asks of it
    for row in rows:
        for lang, model_dir in row.models.items():
            needs.setdefault(Path(model_dir), {})[lang] = None
    results, device = {}, process_device()  # the GPU of an evaluation task given one (ray.task_gpus)
    for model_dir, model_langs in needs.items():
        model = load_lm(model_dir, tokenizer_dir).to(device)
        results[model_dir] = (evaluate(model, {l: val[l] for l in model_langs}, device, batch_size,
                                       bf16=False), n_params(model))
    records = []
    for row in rows:
        losses = {lang: results[Path(d)][0][lang] for lang, d in row.models.items()}
        size = max(results[Path(d)][1] for d in row.models.values())
        record = {"model": row.label, "params_M": round(size / 1e6, 2)}
        record.update({lang: round(perplexity(losses[lang]), 2) if lang in losses else float("nan")
                       for lang in langs})
        record["mean"] = round(perplexity(sum(losses.values()) / len(losses)), 2)
        records.append(record)
    return pd.DataFrame(records)


def per_language_eval(moe: torch.nn.Module, val: dict, device, train: TrainConfig) -> dict[str, float]:
    """Validation loss of each language through its own expert (+ the common one in MoE-CE)."""
    return {l: evaluate(Routed(moe, force=l), {l: blocks}, device, train.batch_size, train.bf16)[l]
            for l, blocks in val.items()}
