"""Balanced batches: equal language shares, determinism (resume), rank disjointness, cycling."""

import numpy as np
import pytest

from mome_ray.data import BalancedBatches
from mome_ray.errors import MomeError


def _blocks(n, lang, T=4):
    return np.stack([np.full(T, lang * 1000 + i) for i in range(n)])


def test_every_batch_holds_an_equal_share_of_each_language():
    b = BalancedBatches([_blocks(10, 0), _blocks(30, 1), _blocks(5, 2)], batch_size=6, seed=0)
    for step in range(20):
        ids, langs = b.batch(step)
        assert ids.shape == (6, 4) and langs.tolist() == [0, 0, 1, 1, 2, 2]
        assert ((ids[:, 0] // 1000) == langs).all()


def test_batches_are_a_function_of_step_so_resume_is_exact():
    mk = lambda: BalancedBatches([_blocks(10, 0), _blocks(7, 1)], batch_size=4, seed=3)
    a, b = mk(), mk()
    for step in (5, 0, 17, 5):
        assert (a.batch(step)[0] == b.batch(step)[0]).all()


def test_ranks_see_disjoint_blocks_within_an_epoch_and_small_languages_cycle():
    seen = {0: [], 1: []}
    for rank in (0, 1):
        b = BalancedBatches([_blocks(40, 0), _blocks(8, 1)], batch_size=4, seed=0, rank=rank, world=2)
        for step in range(b.steps_per_epoch):
            ids, langs = b.batch(step)
            seen[rank] += ids[langs == 0, 0].tolist()
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(40))  # one epoch = the largest language once


def test_batch_size_must_split_evenly():
    with pytest.raises(MomeError, match="multiple of the number of languages"):
        BalancedBatches([_blocks(4, 0), _blocks(4, 1), _blocks(4, 2)], batch_size=8, seed=0)
