"""Training data: token streams cut into blocks, and balanced language batches.

A balanced batch holds an equal share of every language (the paper's teacher recipe): exactly when the batch
size is a multiple of the number of languages, in expectation otherwise (`BalancedBatches`); smaller languages
are cycled. The batch at a given step is a pure function of (seed, step, rank), so resuming from a
checkpoint at step s is just continuing from s, and ranks never see the same block within an epoch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mome_ray.errors import MomeError
from mome_ray.tokenizer import token_path


def load_blocks(tokenizer_dir: Path, split: str, lang: str, block_size: int, limit: int = 0) -> np.ndarray:
    """The (N, block_size) non-overlapping blocks of one language's token stream (memory-mapped); with `limit`
    only the first `limit` (the blocks a teacher-logit cache covers)."""
    path = token_path(tokenizer_dir, split, lang)
    if not path.is_file():
        raise MomeError(f"no '{split}' tokens for language '{lang}' in '{tokenizer_dir}'; is '{lang}' in the "
                        f"corpus? re-run 'mome tokenizer' after 'mome corpus build' with this language")
    stream = np.load(path, mmap_mode="r")
    n = len(stream) // block_size
    if n == 0:
        raise MomeError(f"'{split}' split of '{lang}' has {len(stream)} tokens, fewer than one block of "
                        f"{block_size}; use a shorter n_positions or a larger corpus")
    return stream[: n * block_size].reshape(n, block_size)[: limit or n]


class BalancedBatches:
    """Per step and rank: an equal expected share of every language -> (input_ids (B, T), lang_index (B,)).

    The rule, for n languages and batch size B = q·n + r (0 <= r < n):
    - every batch holds q blocks of every language, plus one block each of r distinct languages (the
      "extra" slots);
    - the extra slots walk round a seeded permutation π of the languages: the g-th draw (g = step·world +
      rank) takes π[g·r mod n], ..., π[(g·r + r − 1) mod n]. Over any n consecutive draws every language gets
      exactly r extras, so over any window of draws the counts of two languages differ by at most 1;
    - language i's blocks are taken in order from its stream of seeded per-epoch permutations, starting after
      the blocks earlier draws took: q·g + (extras of i before draw g). Draws never share a block within a
      language's epoch, so ranks never see the same block and resuming at step s is just continuing from s.
    When r = 0 (B a multiple of n) there are no extras: q blocks of each language, exactly as before.
    Rows are grouped by language, in language order; `lang_index` says each row's language.
    """

    def __init__(self, blocks: list[np.ndarray], batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.blocks, self.batch_size, self.seed, self.rank, self.world = blocks, batch_size, seed, rank, world
        self.per_lang, self.extra = divmod(batch_size, len(blocks))  # q, r
        self.slot = np.random.default_rng([seed, len(blocks)]).permutation(len(blocks))  # language -> its place in π
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    @property
    def steps_per_epoch(self) -> int:
        """Steps until the largest language has been seen about once (smaller ones are cycled)."""
        largest = max(len(b) for b in self.blocks)
        return max(1, largest * len(self.blocks) // (self.batch_size * self.world))

    def _perm(self, lang: int, epoch: int) -> np.ndarray:
        key = (lang, epoch)
        if key not in self._perms:
            if len(self._perms) > 64 + 2 * len(self.blocks):
                self._perms.clear()
            rng = np.random.default_rng([self.seed, lang, epoch])
            self._perms[key] = rng.permutation(len(self.blocks[lang]))
        return self._perms[key]

    def _extras_before(self, lang: int, draw: int) -> int:
        """Extra slots language `lang` got in draws 0..draw-1: how many k < draw·r have k ≡ slot[lang] (mod n)."""
        n = len(self.blocks)
        return (draw * self.extra - int(self.slot[lang]) + n - 1) // n

    def counts(self, step: int) -> list[int]:
        """Blocks of each language in the batch of `step` (on this rank)."""
        draw = step * self.world + self.rank
        return [self.per_lang + self._extras_before(li, draw + 1) - self._extras_before(li, draw)
                for li in range(len(self.blocks))]

    def index(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(language, block) of every row of the batch of `step` on this rank: which block of which language's
        array each row is (the teacher's logit cache is addressed by it)."""
        draw = step * self.world + self.rank
        langs, blocks = [], []
        for li, (lang_blocks, count) in enumerate(zip(self.blocks, self.counts(step))):
            start = self.per_lang * draw + self._extras_before(li, draw)
            for pos in range(start, start + count):
                epoch, i = divmod(pos, len(lang_blocks))
                blocks.append(self._perm(li, epoch)[i])
                langs.append(li)
        return np.array(langs, dtype=np.int64), np.array(blocks, dtype=np.int64)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        langs, blocks = self.index(step)
        ids = torch.from_numpy(np.stack([self.blocks[l][b] for l, b in zip(langs, blocks)]).astype(np.int64))
        return ids, torch.from_numpy(langs)


def eval_blocks(blocks: np.ndarray, limit: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """A fixed evaluation subset (the first `limit` blocks), sharded across ranks."""
    return blocks[:limit][rank::world]


def balanced_data(tokenizer_dir: Path, langs: list[str], block_size: int, batch_size: int, eval_limit: int,
                  seed: int, rank: int = 0, world: int = 1, limit=lambda lang: 0
                  ) -> tuple[BalancedBatches, dict[str, np.ndarray]]:
    """A worker's data: balanced training batches over `langs` (the first `limit(lang)` blocks of each, 0 = all)
    and each language's fixed eval blocks."""
    batches = BalancedBatches([load_blocks(tokenizer_dir, "train", l, block_size, limit(l)) for l in langs],
                              batch_size, seed, rank, world)
    val = {l: eval_blocks(load_blocks(tokenizer_dir, "val", l, block_size), eval_limit, rank, world) for l in langs}
    return batches, val
