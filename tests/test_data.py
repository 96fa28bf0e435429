"""Balanced batches: equal language shares, determinism (resume), rank disjointness, cycling; batch sizes
that are not a multiple of the number of languages (50 languages, batch 8)."""

from collections import Counter

import numpy as np
import torch

from mome_ray.data import BalancedBatches


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


def test_multiples_keep_the_exact_layout_of_before():
    """B = q·n: q blocks of each language at stream positions q·(step·world + rank) onward, as before the
    remainder rule existed (the reference below is the old implementation), so existing runs are unchanged."""
    blocks = [_blocks(10, 0), _blocks(30, 1), _blocks(5, 2)]
    for world in (1, 2):
        for rank in range(world):
            b = BalancedBatches(blocks, batch_size=6, seed=4, rank=rank, world=world)
            assert b.steps_per_epoch == 30 // (2 * world)
            for step in range(25):
                rows = []
                for li, lb in enumerate(blocks):
                    for pos in range((step * world + rank) * 2, (step * world + rank) * 2 + 2):
                        epoch, i = divmod(pos, len(lb))
                        rows.append(lb[np.random.default_rng([4, li, epoch]).permutation(len(lb))[i]])
                assert (b.batch(step)[0] == torch.from_numpy(np.stack(rows))).all()


def _many(n=50, size=12):
    return [_blocks(size + li % 3, li) for li in range(n)]


def test_fifty_languages_in_batches_of_eight():
    b = BalancedBatches(_many(), batch_size=8, seed=0)
    ids, langs = b.batch(0)
    assert ids.shape == (8, 4) and len(set(langs.tolist())) == 8  # 8 distinct languages, one block each
    assert ((ids[:, 0] // 1000) == langs).all()
    assert langs.tolist() == sorted(langs.tolist())  # grouped by language, in language order
    assert b.steps_per_epoch == 14 * 50 // 8


def test_languages_get_equal_counts_over_a_cycle_and_within_one_on_any_window():
    b = BalancedBatches(_many(), batch_size=58, seed=1)  # q = 1, r = 8 extras per step
    counts = Counter()
    for step in range(50):  # n draws: every language gets exactly r extras
        counts.update(b.batch(step)[1].tolist())
        assert len(counts) == 50 and max(counts.values()) - min(counts.values()) <= 1
    assert set(counts.values()) == {1 * 50 + 8}


def test_uneven_batches_are_a_function_of_seed_step_and_rank():
    mk = lambda seed, rank=0: BalancedBatches(_many(), batch_size=8, seed=seed, rank=rank, world=2)
    a, b = mk(3), mk(3)
    for step in (5, 0, 17, 5):
        assert torch.equal(a.batch(step)[0], b.batch(step)[0]) and torch.equal(a.batch(step)[1], b.batch(step)[1])
    assert not torch.equal(mk(3).batch(0)[1], mk(4).batch(0)[1])  # the seed picks the rotation
    assert not torch.equal(mk(3, rank=0).batch(0)[1], mk(3, rank=1).batch(0)[1])


def test_uneven_batches_stay_disjoint_across_ranks_and_steps_within_an_epoch():
    blocks = [_blocks(40, li) for li in range(7)]
    seen = []
    for rank in (0, 1):
        b = BalancedBatches(blocks, batch_size=5, seed=0, rank=rank, world=2)
        for step in range(b.steps_per_epoch):  # 40·7 // (5·2) = 28 steps: 280 blocks of 280
            seen += b.batch(step)[0][:, 0].tolist()
    assert len(seen) == len(set(seen)) == 280
