"""Test-split evaluation: documents of each predicted token, per-document losses, bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mome_ray.errors import MomeError
from mome_ray.evaluation import (Comparison, DocLosses, EvalConfig, compare, doc_losses, eval_set, interval_columns,
                                 load_doc_losses, replicates, save_doc_losses)
from mome_ray.tokenizer import token_path
from mome_ray.training import evaluate, perplexity

EOS = 0


def _write_stream(tok_dir, lang, docs, split="test"):
    stream = np.concatenate([np.r_[np.asarray(d), EOS] for d in docs]).astype(np.uint16)
    path = token_path(tok_dir, split, lang)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, stream)
    return stream


def test_each_predicted_token_belongs_to_its_document(tmp_path):
    # docs of 3, 5 and 6 tokens (+ EOS each): stream of 17 tokens, blocks of 4 -> 4 blocks (1 token dropped)
    _write_stream(tmp_path, "xx", [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    es = eval_set(tmp_path, "xx", 4, eos=EOS)
    assert es.blocks.tolist() == [[1, 2, 3, 0], [4, 5, 6, 7], [8, 0, 9, 10], [11, 12, 13, 14]]
    # targets are positions 1..3 of each block; the EOS ending a document belongs to it
    assert es.docs.tolist() == [[0, 0, 0], [1, 1, 1], [1, 2, 2], [2, 2, 2]]
    assert es.n_docs == 3
    sub = eval_set(tmp_path, "xx", 4, max_blocks=2, eos=EOS)  # evenly spaced: the first and the last block
    assert sub.blocks.tolist() == [[1, 2, 3, 0], [11, 12, 13, 14]] and sub.docs.tolist() == [[0, 0, 0], [1, 1, 1]]


class _Bigram(torch.nn.Module):
    def __init__(self, vocab=16):
        super().__init__()
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.table(input_ids)})


def test_document_losses_add_up_to_the_mean_loss(tmp_path):
    rng = np.random.default_rng(0)
    _write_stream(tmp_path, "xx", [rng.integers(1, 16, rng.integers(3, 30)) for _ in range(40)])
    es = eval_set(tmp_path, "xx", 8, eos=EOS)
    torch.manual_seed(0)
    model = _Bigram()
    d = doc_losses(model, es, torch.device("cpu"), batch_size=5)
    assert d.tokens.sum() == es.docs.size and (d.tokens > 0).all()
    expected = evaluate(model, {"xx": es.blocks}, torch.device("cpu"), 5, bf16=False)["xx"]
    assert d.mean == pytest.approx(expected, rel=1e-6)


def _docs(losses, tokens=None):
    losses = np.asarray(losses, dtype=float)
    tokens = np.full(len(losses), 10) if tokens is None else np.asarray(tokens)
    return DocLosses(losses * tokens, tokens.astype(np.int64))


def test_interval_brackets_the_point_and_is_zero_width_without_spread():
    cfg = EvalConfig(bootstrap=500)
    flat = interval_columns({"a": _docs([2.0] * 30)}, cfg)
    assert flat["ppl_lo/a"] == flat["ppl/a"] == flat["ppl_hi/a"] == round(perplexity(2.0), 2)
    rng = np.random.default_rng(1)
    cols = interval_columns({"a": _docs(rng.normal(3, 0.5, 40)), "b": _docs(rng.normal(4, 0.5, 25))}, cfg)
    for k in ("a", "b"):
        assert cols[f"ppl_lo/{k}"] < cols[f"ppl/{k}"] < cols[f"ppl_hi/{k}"]
    assert cols["mean_ppl_lo"] < cols["mean_ppl"] < cols["mean_ppl_hi"]
    assert cols["mean_loss"] == pytest.approx((cols["loss/a"] + cols["loss/b"]) / 2, abs=1e-4)


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(2)
    cfg, hits, trials = EvalConfig(bootstrap=400), 0, 80
    for t in range(trials):
        docs = _docs(rng.normal(3.0, 0.8, 60))
        cols = interval_columns({"a": docs}, EvalConfig(bootstrap=400, seed=t))
        hits += cols["ppl_lo/a"] <= perplexity(3.0) <= cols["ppl_hi/a"]
    assert 0.85 <= hits / trials <= 1.0, hits / trials
    assert cfg.bootstrap == 400


def test_paired_comparison_sees_a_consistent_small_gap_and_not_noise():
    cfg, rng = EvalConfig(bootstrap=500), np.random.default_rng(3)
    base = rng.normal(3.0, 1.0, 50)  # documents differ a lot from each other ...
    a, b = {"x": _docs(base)}, {"x": _docs(base + 0.02)}  # ... but b is worse on every one of them
    c = compare(a, b, cfg)
    assert c.verdict == "lower" and c.ratio == pytest.approx(np.exp(-0.02), rel=1e-6) and c.hi < 1
    assert compare(b, a, cfg).verdict == "higher"
    assert compare(a, a, cfg).verdict == "no difference"
    noisy = {"x": _docs(base + rng.normal(0, 0.5, 50))}  # no systematic gap
    assert compare(a, noisy, cfg).verdict == "no difference"
    with pytest.raises(MomeError, match="same evaluation sets"):
        compare(a, {"x": _docs(base[:10])}, cfg)


def test_resamples_are_shared_by_models_scored_on_the_same_set():
    a, b = {"x": _docs(np.arange(20.0))}, {"x": _docs(np.arange(20.0) * 2)}
    ra, rb = replicates(a, 50, seed=0), replicates(b, 50, seed=0)
    np.testing.assert_allclose(rb, 2 * ra)  # the same documents drawn for both
    assert str(Comparison(0.9, 0.8, 0.95)) == "0.900x [0.800, 0.950]"


def test_doc_losses_round_trip(tmp_path):
    table = {"PLE | router top-1": {"en": _docs([1.0, 2.0]), "fr": _docs([3.0])}}
    save_doc_losses(tmp_path / "d.npz", table)
    back = load_doc_losses(tmp_path / "d.npz")
    assert list(back) == list(table) and list(back["PLE | router top-1"]) == ["en", "fr"]
    np.testing.assert_array_equal(back["PLE | router top-1"]["en"].loss, table["PLE | router top-1"]["en"].loss)


def test_bad_eval_config_is_refused():
    with pytest.raises(MomeError, match="eval.split"):
        EvalConfig(split="train")
    with pytest.raises(MomeError, match="bootstrap"):
        EvalConfig(bootstrap=10)
