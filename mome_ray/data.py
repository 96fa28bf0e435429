"""Training data: token streams cut into blocks, and balanced language batches.

A balanced batch holds an equal share of every language (the paper's teacher recipe); smaller languages
are cycled. The batch at a given step is a pure function of (seed, step, rank), so resuming from a
checkpoint at step s is just continuing from s, and ranks never see the same block within an epoch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mome_ray.errors import MomeError
from mome_ray.tokenizer import token_path


def load_blocks(tokenizer_dir: Path, split: str, lang: str, block_size: int) -> np.ndarray:
    """The (N, block_size) non-overlapping blocks of one language's token stream (memory-mapped)."""
    path = token_path(tokenizer_dir, split, lang)
    if not path.is_file():
        raise MomeError(f"no '{split}' tokens for language '{lang}' in '{tokenizer_dir}'; is '{lang}' in the "
                        f"corpus? re-run 'mome tokenizer' after 'mome corpus build' with this language")
    stream = np.load(path, mmap_mode="r")
    n = len(stream) // block_size
    if n == 0:
        raise MomeError(f"'{split}' split of '{lang}' has {len(stream)} tokens, fewer than one block of "
                        f"{block_size}; use a shorter n_positions or a larger corpus")
    return stream[: n * block_size].reshape(n, block_size)


class BalancedBatches:
    """Per step and rank: `per_lang` blocks of every language -> (input_ids (B, T), lang_index (B,))."""

    def __init__(self, blocks: list[np.ndarray], batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if batch_size % len(blocks):
            raise MomeError(f"batch_size ({batch_size}) must be a multiple of the number of languages ({len(blocks)}) "
                            f"so every batch holds an equal share of each")
        self.blocks, self.seed, self.rank, self.world = blocks, seed, rank, world
        self.per_lang = batch_size // len(blocks)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    @property
    def steps_per_epoch(self) -> int:
        """Steps until the largest language has been seen once (smaller ones are cycled)."""
        largest = max(len(b) for b in self.blocks)
        return max(1, largest // (self.per_lang * self.world))

    def _perm(self, lang: int, epoch: int) -> np.ndarray:
        key = (lang, epoch)
        if key not in self._perms:
            if len(self._perms) > 64:
                self._perms.clear()
            rng = np.random.default_rng([self.seed, lang, epoch])
            self._perms[key] = rng.permutation(len(self.blocks[lang]))
        return self._perms[key]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, langs = [], []
        for li, blocks in enumerate(self.blocks):
            start = (step * self.world + self.rank) * self.per_lang
            for pos in range(start, start + self.per_lang):
                epoch, i = divmod(pos, len(blocks))
                rows.append(blocks[self._perm(li, epoch)[i]])
                langs.append(li)
        ids = torch.from_numpy(np.stack(rows).astype(np.int64))
        return ids, torch.tensor(langs)


def eval_blocks(blocks: np.ndarray, limit: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """A fixed evaluation subset (the first `limit` blocks), sharded across ranks."""
    return blocks[:limit][rank::world]


def balanced_data(tokenizer_dir: Path, langs: list[str], block_size: int, batch_size: int, eval_limit: int,
                  seed: int, rank: int = 0, world: int = 1) -> tuple[BalancedBatches, dict[str, np.ndarray]]:
    """A worker's data: balanced training batches over `langs` and each language's fixed eval blocks."""
    batches = BalancedBatches([load_blocks(tokenizer_dir, "train", l, block_size) for l in langs], batch_size, seed,
                              rank, world)
    val = {l: eval_blocks(load_blocks(tokenizer_dir, "val", l, block_size), eval_limit, rank, world) for l in langs}
    return batches, val
