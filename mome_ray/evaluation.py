"""Held-out evaluation: per-language perplexity on the test split, with 95 % bootstrap intervals by document.

    sets = eval_sets(tok_dir, langs, block_size, cfg.eval)        # the same blocks for every model
    docs = {l: doc_losses(model, sets[l], device) for l in langs}  # (loss sum, tokens) per document
    row = interval_columns(docs, cfg.eval)                        # ppl/<l>, ppl_lo/<l>, ppl_hi/<l>, mean_*
    compare(docs_a, docs_b, cfg.eval)                             # paired: "lower" | "higher" | "no difference"

Select on validation, report on test: training runs and sweeps watch the validation split; every table and
claim is scored here, on the test split (`eval.split`). A language's evaluation set is its whole split cut
into non-overlapping blocks (or, with `eval.max_blocks`, that many blocks evenly spaced along the
document-ordered stream), each predicted token tagged with the document it belongs to (documents end with
EOS in the token stream). Perplexity is exp of the mean next-token loss over the set's tokens.

Intervals resample **documents** with replacement (tokens of one document are not independent draws), 1,000
times by default, and take the 2.5 and 97.5 percentiles. The resample of a language depends only on the
number of its documents and `eval.seed`, so every model scored on the same set gets the same resamples:
differences between two models are paired. "mean" is exp of the mean over languages of each language's
mean loss (every language weighs the same). Two models differ when the 95 % interval of their mean-loss
difference excludes 0; otherwise the tables say "no difference".
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mome_ray.errors import MomeError
from mome_ray.training import TrainConfig, evaluate, perplexity, process_device

LEVEL = 0.95


@dataclass
class EvalConfig:
    split: str = "test"  # where tables and claims are scored (validation is for selection)
    max_blocks: int = 0  # blocks per language (0 = the whole split; else evenly spaced along the split)
    bootstrap: int = 1000  # document resamples for the 95 % intervals
    seed: int = 0  # the resamples' seed (the same for every model: paired comparisons)
    batch_size: int = 16

    def __post_init__(self):
        if self.split not in ("test", "val"):
            raise MomeError(f"eval.split must be 'test' or 'val', got '{self.split}'")
        if self.max_blocks < 0 or self.bootstrap < 100 or self.batch_size < 1:
            raise MomeError(f"eval: max_blocks must be >= 0 (0 = all), bootstrap >= 100 and batch_size >= 1; got "
                            f"{self.max_blocks}, {self.bootstrap}, {self.batch_size}")


@dataclass
class EvalSet:
    """One language's evaluation blocks and, for each predicted token (positions 1..T-1), its document."""

    blocks: np.ndarray  # (N, T) token ids
    docs: np.ndarray  # (N, T-1) document index in 0..n_docs-1
    n_docs: int


@dataclass
class DocLosses:
    """Summed next-token loss and token count of every document of an evaluation set (one model)."""

    loss: np.ndarray  # (D,) float64
    tokens: np.ndarray  # (D,) int64

    @property
    def mean(self) -> float:
        return float(self.loss.sum() / max(self.tokens.sum(), 1))


def eval_set(tokenizer_dir: Path, lang: str, block_size: int, split: str = "test", max_blocks: int = 0,
             eos: int | None = None) -> EvalSet:
    """The blocks of `split` for `lang` (all, or `max_blocks` evenly spaced) with each target's document."""
    from mome_ray.data import load_blocks
    from mome_ray.tokenizer import load_tokenizer

    blocks = np.asarray(load_blocks(tokenizer_dir, split, lang, block_size))
    if eos is None:
        eos = load_tokenizer(tokenizer_dir).eos_token_id
    # The document of stream position p = EOS tokens before p (each document ends with its EOS).
    flat = blocks.reshape(-1)
    doc_of = np.concatenate([[0], np.cumsum(flat == eos)[:-1]]).reshape(blocks.shape)
    keep = np.arange(len(blocks))
    if max_blocks and max_blocks < len(blocks):
        keep = np.unique(np.linspace(0, len(blocks) - 1, max_blocks).round().astype(int))
    docs = doc_of[keep, 1:]
    _, compact = np.unique(docs, return_inverse=True)
    return EvalSet(blocks[keep], compact.reshape(docs.shape), int(compact.max()) + 1)


def eval_sets(tokenizer_dir: Path, langs: list[str], block_size: int, cfg: EvalConfig) -> dict[str, EvalSet]:
    from mome_ray.tokenizer import load_tokenizer

    eos = load_tokenizer(tokenizer_dir).eos_token_id
    return {l: eval_set(tokenizer_dir, l, block_size, cfg.split, cfg.max_blocks, eos) for l in langs}


@torch.no_grad()
def doc_losses(model, es: EvalSet, device, batch_size: int = 16) -> DocLosses:
    """Per-document summed loss of `model` (called as `model(input_ids=ids).logits`) on an evaluation set."""
    import torch.nn.functional as F

    was_training = getattr(model, "training", False)
    model.eval()
    losses = np.empty(es.docs.shape, dtype=np.float64)
    for i in range(0, len(es.blocks), batch_size):
        ids = torch.from_numpy(es.blocks[i: i + batch_size].astype("int64")).to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        per_token = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        losses[i: i + len(ids)] = per_token.view(len(ids), -1).double().cpu().numpy()
    model.train(was_training)
    return DocLosses(np.bincount(es.docs.ravel(), losses.ravel(), es.n_docs),
                     np.bincount(es.docs.ravel(), minlength=es.n_docs).astype(np.int64))


def _resamples(lang: str, n_docs: int, n: int, seed: int) -> np.ndarray:
    """(n, n_docs) document indices: a function of (language, number of documents, n, seed) only."""
    rng = np.random.default_rng([seed, zlib.crc32(lang.encode()), n_docs])
    return rng.integers(0, n_docs, size=(n, n_docs))


def replicates(docs: dict[str, DocLosses], n: int = 1000, seed: int = 0) -> np.ndarray:
    """(n, L) bootstrap replicates of each language's mean loss (columns in `docs` order)."""
    out = np.empty((n, len(docs)))
    for j, (lang, d) in enumerate(docs.items()):
        idx = _resamples(lang, len(d.loss), n, seed)
        out[:, j] = d.loss[idx].sum(1) / np.maximum(d.tokens[idx].sum(1), 1)
    return out


def _bounds(values: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(values, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
    return float(lo), float(hi)


def interval_columns(docs: dict[str, DocLosses], cfg: EvalConfig) -> dict:
    """Flat table columns: loss/<l>, ppl/<l>, ppl_lo/<l>, ppl_hi/<l> per language, and the same for the mean."""
    reps = replicates(docs, cfg.bootstrap, cfg.seed)
    out: dict = {}
    for j, (lang, d) in enumerate(docs.items()):
        lo, hi = _bounds(reps[:, j])
        out.update({f"loss/{lang}": round(d.mean, 4), f"ppl/{lang}": round(perplexity(d.mean), 2),
                    f"ppl_lo/{lang}": round(perplexity(lo), 2), f"ppl_hi/{lang}": round(perplexity(hi), 2)})
    mean = float(np.mean([d.mean for d in docs.values()]))
    lo, hi = _bounds(reps.mean(1))
    out.update(mean_loss=round(mean, 4), mean_ppl=round(perplexity(mean), 2), mean_ppl_lo=round(perplexity(lo), 2),
               mean_ppl_hi=round(perplexity(hi), 2))
    return out


@dataclass
class Comparison:
    """a vs b on the same evaluation sets: perplexity ratio exp(mean loss a − mean loss b) with its interval."""

    ratio: float
    lo: float
    hi: float
    verdict: str = field(init=False)  # "lower" (a better), "higher" (a worse) or "no difference"

    def __post_init__(self):
        self.verdict = "lower" if self.hi < 1 else "higher" if self.lo > 1 else "no difference"

    def __str__(self) -> str:
        return f"{self.ratio:.3f}x [{self.lo:.3f}, {self.hi:.3f}]"


def compare(a: dict[str, DocLosses], b: dict[str, DocLosses], cfg: EvalConfig) -> Comparison:
    """Paired bootstrap of the mean-over-languages loss difference a − b (same documents resampled)."""
    if list(a) != list(b) or any(len(a[l].loss) != len(b[l].loss) for l in a):
        raise MomeError("compare: the two models were not scored on the same evaluation sets")
    diff = (replicates(a, cfg.bootstrap, cfg.seed) - replicates(b, cfg.bootstrap, cfg.seed)).mean(1)
    point = float(np.mean([a[l].mean - b[l].mean for l in a]))
    lo, hi = _bounds(diff)
    return Comparison(float(np.exp(point)), float(np.exp(lo)), float(np.exp(hi)))


def save_doc_losses(path: Path, table: dict[str, dict[str, DocLosses]]) -> None:
    """{row label: {lang: DocLosses}} -> one .npz (read back by `load_doc_losses`, e.g. by the report)."""
    arrays = {}
    for key, docs in table.items():
        for lang, d in docs.items():
            arrays[f"{key}\t{lang}\tloss"], arrays[f"{key}\t{lang}\ttokens"] = d.loss, d.tokens
    np.savez_compressed(path, **arrays)


def load_doc_losses(path: Path) -> dict[str, dict[str, DocLosses]]:
    out: dict[str, dict[str, DocLosses]] = {}
    with np.load(path) as z:
        for name in z.files:
            key, lang, kind = name.split("\t")
            if kind == "loss":
                out.setdefault(key, {})[lang] = DocLosses(z[name], z[f"{key}\t{lang}\ttokens"])
    return out


def shown(df, langs: list[str]):
    """A table as printed: 'ppl [lo, hi]' per language and for the mean, beside the other columns."""
    out = df[[c for c in df.columns if "/" not in c and not c.startswith("mean_")]].copy()
    for key in [*langs, "mean"]:
        p, lo, hi = ((f"ppl/{key}", f"ppl_lo/{key}", f"ppl_hi/{key}") if key != "mean"
                     else ("mean_ppl", "mean_ppl_lo", "mean_ppl_hi"))
        if p in df:
            out[key] = [f"{a:,.1f} [{b:,.1f}, {c:,.1f}]" if a == a else "-" for a, b, c in zip(df[p], df[lo], df[hi])]
    return out


@dataclass
class Row:
    label: str
    models: dict[str, Path]  # language -> model directory


def perplexity_table(rows: list[Row], tokenizer_dir: Path, langs: list[str], block_size: int, cfg: EvalConfig):
    """One record per row (every model on the same test blocks) and {row label: {lang: DocLosses}}."""
    import pandas as pd

    from mome_ray.models import load_lm, n_params

    sets = eval_sets(tokenizer_dir, langs, block_size, cfg)
    needs: dict[Path, dict[str, None]] = {}  # each model once, on every language any row asks of it
    for row in rows:
        for lang, model_dir in row.models.items():
            needs.setdefault(Path(model_dir), {})[lang] = None
    results, device = {}, process_device()  # the GPU of an evaluation task given one (ray.task_gpus)
    for model_dir, model_langs in needs.items():
        model = load_lm(model_dir, tokenizer_dir).to(device)
        results[model_dir] = ({l: doc_losses(model, sets[l], device, cfg.batch_size) for l in model_langs},
                              n_params(model))
    records, docs = [], {}
    for row in rows:
        docs[row.label] = {lang: results[Path(d)][0][lang] for lang, d in row.models.items()}
        size = max(results[Path(d)][1] for d in row.models.values())
        records.append({"model": row.label, "params_M": round(size / 1e6, 2)} | interval_columns(docs[row.label], cfg))
    return pd.DataFrame(records), docs


def per_language_eval(moe: torch.nn.Module, val: dict, device, train: TrainConfig) -> dict[str, float]:
    """Validation loss of each language through its own expert (+ the common one in MoE-CE)."""
    from mome_ray.moe import Routed

    return {l: evaluate(Routed(moe, force=l), {l: blocks}, device, train.batch_size, train.bf16)[l]
            for l, blocks in val.items()}
