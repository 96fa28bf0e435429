"""The teacher's next-token log-probs, computed once for the blocks students train on, read by every KD run.

    mome teacher-logits --config configs/small.yaml       # also a pipeline stage, after `teacher`
    ray job submit --working-dir . -- python -m jobs.cache_teacher_logits --config configs/small.yaml

One Ray task per language runs the teacher over the first `max_blocks` training blocks of that language (all
of them by default), in order, and writes RUN_DIR/teacher_logits/<lang>/ through the run's storage (a nested
artifact: local folder, shared mount or s3:// alike):

    logp.npy      (N, T−1, k) float16  log-probs of the teacher's top k tokens at each position, largest first
    ids.npy       (N, T−1, k) int16/32 their token ids                      (absent with the full vocabulary)
    log_tail.npy  (N, T−1)    float32  log of the mass outside the top k    (absent with the full vocabulary)
    tail_ids.npy, tail_logp.npy (N, T−1, m)  m tail tokens sampled ∝ p (without replacement) and their log-probs

Row n is block n of `data.load_blocks(tokenizer, "train", lang, T)`: a student reading the cache trains on those
N blocks only (`CachedTeacher.train_limit`), draws them with `BalancedBatches` as always, and looks its rows up
by `BalancedBatches.index`. A KD run loads its languages' arrays once, memory-mapped: no file I/O per step.
When no KD run reads the cache (`distill.teacher` and `moe.teacher` both `online`) the stage writes only its
meta.json, saying so. How the loss uses the rows: `losses.cached_kd`.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mome_ray.errors import MomeError
from mome_ray.losses import TAILS, TeacherRows
from mome_ray.storage import RunStore

STAGE = "teacher_logits"
ARRAYS = ("logp", "ids", "log_tail", "tail_ids", "tail_logp")


@dataclass
class LogitCacheConfig:
    top_k: int = 32  # log-probs kept per position (0, or >= the vocabulary: the full vocabulary)
    tail_samples: int = 8  # tail tokens also kept per position, sampled from the teacher ∝ p (without replacement)
    tail: str = "bucket"  # how KD stands in for the rest of the vocabulary: bucket or uniform (losses.cached_kd)
    max_blocks: int = 0  # training blocks cached per language, the first ones (0 = all); students train on these
    batch_size: int = 32  # blocks per teacher forward pass

    def __post_init__(self):
        if self.top_k < 0:
            raise MomeError(f"teacher_logits.top_k must be >= 0 (0 = the full vocabulary), got {self.top_k}")
        if self.tail not in TAILS:
            raise MomeError(f"teacher_logits.tail '{self.tail}' is not one of {list(TAILS)}")
        for name in ("tail_samples", "max_blocks"):
            if getattr(self, name) < 0:
                raise MomeError(f"teacher_logits.{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size < 1:
            raise MomeError(f"teacher_logits.batch_size must be >= 1, got {self.batch_size}")


def users(cfg) -> list[str]:
    """The config sections whose KD runs read the cache (`Settings`)."""
    return [s for s in ("distill", "moe") if getattr(cfg, s).teacher == "cached"]


def artifact(lang: str) -> str:
    return f"{STAGE}/{lang}"


# --- writing: one language's cache (a Ray task) ------------------------------------------------------------


def cache_language(cfg: LogitCacheConfig, lang: str, store: RunStore, block_size: int, config: dict,
                   parents: dict, seed: int, log=print) -> dict:
    """Run the teacher over `lang`'s first training blocks and publish RUN_DIR/teacher_logits/<lang>/ (unless
    it is up to date); returns its meta."""
    from mome_ray.artifacts import stage_writer, write_meta
    from mome_ray.data import load_blocks
    from mome_ray.models import load_lm

    name, config = artifact(lang), {**config, "lang": lang}
    old = store.meta(name)
    if old is not None and old["config"] == config and old["parents"] == parents:
        log(f"[{STAGE} {lang}] up to date in {store.uri(name)}")
        return old
    tok_dir = store.fetch("tokenizer")
    teacher = load_lm(store.fetch("teacher"), tok_dir).eval().requires_grad_(False)
    blocks = load_blocks(tok_dir, "train", lang, block_size, cfg.max_blocks)
    n, T, V = len(blocks), block_size - 1, teacher.config.vocab_size
    k = V if cfg.top_k == 0 or cfg.top_k >= V else cfg.top_k
    m = min(cfg.tail_samples, V - k)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(lang.encode()))
    t0 = time.perf_counter()
    with stage_writer(store, name) as out:
        arrays = _open_arrays(out, n, T, V, k, m)
        log(f"[{STAGE} {lang}] {n} blocks x {T} positions, top {k} of {V}"
            + (f" + {m} sampled tail tokens" if m else "") + f": {_size(arrays) / 2**20:,.0f} MiB")
        every = max(1, n // cfg.batch_size // 10)
        for i, start in enumerate(range(0, n, cfg.batch_size)):
            stop = min(start + cfg.batch_size, n)
            with torch.no_grad():
                ids = torch.from_numpy(blocks[start:stop].astype(np.int64))
                lp = torch.log_softmax(teacher(input_ids=ids).logits[:, :-1].float(), dim=-1)
                for key, value in _top_k(lp, k, m, gen).items():
                    arrays[key][start:stop] = value.numpy()
            if (i + 1) % every == 0 or stop == n:
                rate = stop / (time.perf_counter() - t0)
                log(f"[{STAGE} {lang}] {stop}/{n} blocks  {rate:,.1f} blocks/s  ETA {(n - stop) / rate:,.0f}s")
        for a in arrays.values():
            a.flush()
        metrics = {"blocks": n, "block_size": block_size, "vocab": V, "top_k": k, "tail": cfg.tail, "tail_samples": m,
                   "full": k == V, "bytes": _size(arrays), "seconds": round(time.perf_counter() - t0, 1)}
        del arrays
        return write_meta(out, STAGE, config, metrics, parents, seed)


def _open_arrays(out: Path, n: int, T: int, V: int, k: int, m: int) -> dict[str, np.memmap]:
    id_type = np.int16 if V <= np.iinfo(np.int16).max + 1 else np.int32
    shapes = {"logp": ((n, T, k), np.float16)}
    if k < V:
        shapes |= {"ids": ((n, T, k), id_type), "log_tail": ((n, T), np.float32)}
    if m:
        shapes |= {"tail_ids": ((n, T, m), id_type), "tail_logp": ((n, T, m), np.float16)}
    return {key: np.lib.format.open_memmap(out / f"{key}.npy", "w+", dtype, shape)
            for key, (shape, dtype) in shapes.items()}


def _size(arrays: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in arrays.values())


def _top_k(lp: torch.Tensor, k: int, m: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """(B, T, V) log-probs -> the arrays of one batch of blocks (see the module docstring)."""
    if k == lp.shape[-1]:
        return {"logp": lp.half()}
    top, ids = lp.topk(k, dim=-1)
    rest = lp.scatter(-1, ids, float("-inf"))  # the tail's log-probs, top k removed
    out = {"logp": top.half(), "ids": ids.short() if lp.shape[-1] <= 32768 else ids.int(),
           "log_tail": rest.logsumexp(-1)}
    if m:  # Gumbel-top-m: m distinct tail tokens drawn ∝ p
        gumbel = -torch.log(-torch.log(torch.rand(rest.shape, generator=gen).clamp(1e-20, 1.0)))
        tail_ids = (rest + gumbel).topk(m, dim=-1).indices
        out |= {"tail_ids": tail_ids.to(out["ids"].dtype), "tail_logp": lp.gather(-1, tail_ids).half()}
    return out


# --- reading: a KD run's teacher -------------------------------------------------------------------------


def check_cache(store: RunStore, langs: list[str], block_size: int, teacher_created: str, section: str) -> None:
    """On the driver, before KD runs start: the cache holds `langs` for blocks of `block_size`, from this teacher."""
    make = f"run 'mome teacher-logits --config CONFIG' (or set {section}.teacher=online)"
    stage = store.meta(STAGE)
    if stage is not None and "skipped" in stage["metrics"]:
        raise MomeError(f"{section}.teacher is 'cached' but the {STAGE} stage was skipped ({stage['metrics']['skipped']}); "
                        f"{make} with the same config")
    for lang in langs:
        meta = store.meta(artifact(lang))
        if meta is None:
            raise MomeError(f"no cached teacher logits for '{lang}' in '{store.location}'; {make}")
        if meta["parents"].get("teacher") != teacher_created:
            raise MomeError(f"the cached teacher logits of '{lang}' come from an older teacher; {make}")
        if meta["metrics"]["block_size"] != block_size:
            raise MomeError(f"the cached teacher logits of '{lang}' are for blocks of {meta['metrics']['block_size']} "
                            f"tokens, {section}.model.n_positions is {block_size}; make them equal and {make}")


class CachedTeacher:
    """A KD run's teacher read from the cache: `rows` looks up the stored rows of the batch's blocks."""

    def __init__(self, langs: list[str], caches: list[dict[str, np.ndarray]], vocab: int, tail: str):
        self.caches, self.vocab, self.tail = caches, vocab, tail
        self.limits = {lang: len(c["logp"]) for lang, c in zip(langs, caches)}

    @classmethod
    def load(cls, store: RunStore, langs: list[str], block_size: int) -> CachedTeacher:
        """`langs`' caches (in this order: the batches' language index), fetched to this node and memory-mapped."""
        metas = [store.meta(artifact(lang)) for lang in langs]
        missing = [lang for lang, meta in zip(langs, metas) if meta is None]
        if missing:
            raise MomeError(f"no cached teacher logits for {missing}; run 'mome teacher-logits --config CONFIG'")
        caches = []
        for lang in langs:
            folder = store.fetch(artifact(lang))
            caches.append({key: np.load(folder / f"{key}.npy", mmap_mode="r") for key in ARRAYS
                           if (folder / f"{key}.npy").is_file()})
        if any(m["metrics"]["block_size"] != block_size for m in metas):
            raise MomeError(f"cached teacher logits are for blocks of {metas[0]['metrics']['block_size']} tokens, "
                            f"this run reads {block_size}; run 'mome teacher-logits' with the same n_positions")
        return cls(langs, caches, metas[0]["metrics"]["vocab"], metas[0]["metrics"]["tail"])

    def train_limit(self, lang: str) -> int:
        """How many of `lang`'s first training blocks the cache covers: the blocks a student may train on."""
        return self.limits[lang]

    def rows(self, ids: torch.Tensor, index: tuple[np.ndarray, np.ndarray]) -> TeacherRows:
        """The stored rows of the batch's (language, block) pairs (`BalancedBatches.index`), on `ids`' device."""
        langs, blocks = index

        def take(key):
            if key not in self.caches[0]:
                return None
            return torch.from_numpy(np.stack([self.caches[l][key][b] for l, b in zip(langs, blocks)])).to(ids.device)

        return TeacherRows(take("logp"), self.vocab, take("ids"), take("log_tail"), take("tail_ids"), take("tail_logp"))

