"""The teacher-logit cache: the cached KD loss (exact with the full vocabulary, the tail bucket by hand), a KD step
on the cache equal to the online one, and the cache written and read through a RunStore (local and URI)."""

import math
import shutil
from pathlib import Path

import pytest
import torch

from mome_ray.artifacts import write_meta
from mome_ray.config import from_dict
from mome_ray.data import BalancedBatches, load_blocks
from mome_ray.errors import MomeError
from mome_ray.kd import OnlineTeacher, kd_step
from mome_ray.logit_cache import CachedTeacher, LogitCacheConfig, cache_language, check_cache
from mome_ray.losses import DIVERGENCES, KD_LOSSES, TeacherRows, cached_kd
from mome_ray.models import ModelConfig, build_gpt2
from mome_ray.storage import RunStore
from mome_ray.tokenizer import load_tokenizer
from mome_ray.training import TrainConfig, build_schedule

torch.manual_seed(0)
V = 11
S = torch.randn(2, 5, V) * 2  # student logits (B, T, V)
Tt = torch.randn(2, 5, V) * 2  # teacher logits
PARAMS = {"jsd": {"beta": 0.3}, "skew_kl": {"skew": 0.2}}


def top_k_rows(teacher_logits, k, samples=0, seed=0):
    """Rows as the cache stage makes them (in float32): top k, their ids, the tail's log mass, sampled tail tokens."""
    from mome_ray.logit_cache import _top_k

    lp = torch.log_softmax(teacher_logits.float(), -1)
    arrays = _top_k(lp, k, samples, torch.Generator().manual_seed(seed))
    arrays["logp"] = lp.gather(-1, arrays["ids"].long())  # float32, not the stored float16
    if samples:
        arrays["tail_logp"] = lp.gather(-1, arrays["tail_ids"].long())
    return TeacherRows(vocab=teacher_logits.shape[-1], **arrays)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("tail", ["bucket", "uniform"])
def test_full_vocabulary_cached_loss_is_the_online_loss(name, tail):
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    for tau in (1.0, 2.0):
        online = KD_LOSSES[name](S, Tt, mask, tau, **PARAMS.get(name, {}))
        full = TeacherRows(torch.log_softmax(Tt, -1), V)  # ids None: every token, in id order
        assert cached_kd(name, S, full, mask, tau, tail, **PARAMS.get(name, {})).item() == pytest.approx(online.item(), rel=1e-5)
    # Sampling every tail token is the whole distribution too, whatever k is.
    rows = top_k_rows(Tt, k=3, samples=V - 3)
    online = KD_LOSSES[name](S, Tt, **PARAMS.get(name, {}))
    assert cached_kd(name, S, rows, tail=tail, **PARAMS.get(name, {})).item() == pytest.approx(online.item(), rel=1e-4)


def test_tail_bucket_against_a_hand_computation():
    student = torch.tensor([[[2.0, 1.0, 0.0, -1.0, 0.5]]])
    teacher = torch.tensor([[[0.0, 3.0, 1.0, -2.0, 0.0]]])
    rows = top_k_rows(teacher, k=2)
    assert rows.ids[0, 0].tolist() == [1, 2]
    q = [math.exp(x) for x in student[0, 0].tolist()]
    p = [math.exp(x) for x in teacher[0, 0].tolist()]
    q, p = [x / sum(q) for x in q], [x / sum(p) for x in p]
    # categories: token 1, token 2, the tail {0, 3, 4}
    qc, pc = [q[1], q[2], q[0] + q[3] + q[4]], [p[1], p[2], p[0] + p[3] + p[4]]
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b))  # noqa: E731
    assert cached_kd("forward_kl", student, rows).item() == pytest.approx(kl(pc, qc), rel=1e-5)
    assert cached_kd("reverse_kl", student, rows).item() == pytest.approx(kl(qc, pc), rel=1e-5)
    m = [0.5 * x + 0.5 * y for x, y in zip(pc, qc)]
    assert cached_kd("jsd", student, rows).item() == pytest.approx(0.5 * kl(pc, m) + 0.5 * kl(qc, m), rel=1e-5)
    sk = [0.1 * x + 0.9 * y for x, y in zip(pc, qc)]
    assert cached_kd("skew_kl", student, rows).item() == pytest.approx(kl(pc, sk), rel=1e-5)
    # Sampled tail tokens are known exactly too: with token 4 sampled, the bucket holds {0, 3}.
    sampled = TeacherRows(rows.logp, 5, rows.ids, rows.log_tail, torch.tensor([[[4]]]),
                          torch.tensor([[[math.log(p[4])]]]))
    qs, ps = [q[1], q[2], q[4], q[0] + q[3]], [p[1], p[2], p[4], p[0] + p[3]]
    assert cached_kd("reverse_kl", student, sampled).item() == pytest.approx(kl(qs, ps), rel=1e-5)
    # The bucket under-estimates the forward KL (log-sum inequality); a uniform tail is its own distribution.
    assert cached_kd("forward_kl", student, rows).item() < KD_LOSSES["forward_kl"](student, teacher).item()
    uniform = [p[1], p[2]] + [(p[0] + p[3] + p[4]) / 3] * 3
    qu = [q[1], q[2], q[0], q[3], q[4]]
    assert cached_kd("forward_kl", student, rows, tail="uniform").item() == pytest.approx(kl(uniform, qu), rel=1e-5)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("samples", [0, 2])
def test_the_sparse_kls_equal_the_divergence_of_the_dense_teacher(name, samples):
    """forward/reverse KL skip building the (B, T, V) teacher: same value and gradient as the dense one."""
    from mome_ray.losses import _dense, _known, _reduce, log_probs

    rows = top_k_rows(Tt, k=3, samples=samples)
    for tau in (1.0, 2.0):
        fast = S.clone().requires_grad_()
        cached_kd(name, fast, rows, temperature=tau, tail="uniform").backward()
        slow = S.clone().requires_grad_()
        dense = _reduce(DIVERGENCES[name](log_probs(slow, tau), _dense(*_known(rows, tau), V)), None, tau)
        dense.backward()
        assert cached_kd(name, S, rows, temperature=tau, tail="uniform").item() == pytest.approx(dense.item(), rel=1e-5)
        torch.testing.assert_close(fast.grad, slow.grad, rtol=1e-4, atol=1e-6)


def _student(seed=0):
    torch.manual_seed(seed)
    return build_gpt2(ModelConfig(n_layer=1, n_embd=32, n_head=2, n_positions=16), 64, 0, 1)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_a_kd_step_on_the_full_vocabulary_cache_is_the_online_step(name):
    """Same student, same batches: the cache's rows (the teacher's log-probs of each block) give the same
    gradients as running the teacher."""
    cfg = TrainConfig(max_steps=3, lr=0.5, warmup_frac=0.0)
    teacher = _student(seed=7).eval()
    blocks = torch.randint(0, 64, (12, 16), generator=torch.Generator().manual_seed(1)).numpy()
    with torch.no_grad():
        logp = torch.log_softmax(teacher(input_ids=torch.from_numpy(blocks)).logits[:, :-1], -1).numpy()
    cached = CachedTeacher(["en"], [{"logp": logp}], 64, "bucket")
    batches = BalancedBatches([blocks], batch_size=4, seed=0)
    online_student, cached_student = _student(), _student()
    opts = [(m, *_opt(m, cfg)) for m in (online_student, cached_student)]
    cpu = torch.device("cpu")
    for step in range(3):
        ids, _ = batches.batch(step)
        (a, opt_a, sched_a), (b, opt_b, sched_b) = opts
        ce_a, kd_a = kd_step(a, OnlineTeacher(teacher), opt_a, sched_a, ids, None, 0.5, 0.5, name, 2.0, cfg, cpu)
        ce_b, kd_b = kd_step(b, cached, opt_b, sched_b, ids, batches.index(step), 0.5, 0.5, name, 2.0, cfg, cpu)
        assert ce_b == pytest.approx(ce_a, rel=1e-6) and kd_b == pytest.approx(kd_a, rel=1e-5)
    moved = 0.0
    for pa, pb, p0 in zip(online_student.parameters(), cached_student.parameters(), _student().parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
        moved = max(moved, (pa - p0).abs().max().item())
    assert moved > 1e-3


def _opt(model, cfg):
    """Plain SGD: parameters move by lr × gradient, so equal parameters mean equal gradients (Adam would
    magnify float noise in near-zero gradients)."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    return opt, build_schedule(opt, cfg)


def test_config_errors_say_what_is_wrong():
    with pytest.raises(MomeError, match="top_k must be >= 0"):
        from_dict(LogitCacheConfig, {"top_k": -1})
    with pytest.raises(MomeError, match="tail 'flat' is not one of"):
        from_dict(LogitCacheConfig, {"tail": "flat"})
    with pytest.raises(MomeError, match="tail_samples must be >= 0"):
        from_dict(LogitCacheConfig, {"tail_samples": -1})
    from mome_ray.distill import DistillConfig

    with pytest.raises(MomeError, match="must be one of \\['online', 'cached'\\]"):
        from_dict(DistillConfig, {"teacher": "offline"})


# --- the stage's work through a RunStore ---------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_run(tiny_tokenized, tmp_path_factory):
    """The tiny run's tokenizer + an untrained tiny teacher, published as the `teacher` artifact (no Ray)."""
    from tests.conftest import copy_run

    run_dir = copy_run(tiny_tokenized.run_dir, tmp_path_factory.mktemp("cache_run"))
    tok = load_tokenizer(run_dir / "tokenizer")
    torch.manual_seed(0)
    model = build_gpt2(ModelConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64), len(tok), tok.eos_token_id,
                       tok.pad_token_id)
    (run_dir / "teacher").mkdir()
    model.save_pretrained(str(run_dir / "teacher"))
    tok.save_pretrained(str(run_dir / "teacher"))
    write_meta(run_dir / "teacher", "teacher", {"teacher": {"model": {"n_positions": 64}}}, {}, {}, 0)
    return run_dir, model


@pytest.fixture(params=["local", "uri"])
def store(request, teacher_run, tmp_path, monkeypatch):
    monkeypatch.setenv("MOME_CACHE_DIR", str(tmp_path / "cache"))
    run_dir, _ = teacher_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return RunStore(copy if request.param == "local" else f"file://{copy}")


@pytest.mark.parametrize("top_k", [5, 0])
def test_the_cache_is_written_and_read_through_the_run_store(store, teacher_run, top_k):
    _, model = teacher_run
    cfg = LogitCacheConfig(top_k=top_k, tail_samples=3, max_blocks=6, batch_size=4)
    parents = {"tokenizer": store.meta("tokenizer")["created"], "teacher": store.meta("teacher")["created"]}
    lines = []
    meta = cache_language(cfg, "fr", store, 64, {"c": 1}, parents, 0, log=lines.append)
    assert any("6/6 blocks" in line for line in lines)
    assert meta["metrics"]["blocks"] == 6 and meta["metrics"]["full"] == (top_k == 0)
    assert set(meta["files"]) >= ({"logp.npy"} if top_k == 0 else {"logp.npy", "ids.npy", "log_tail.npy",
                                                                    "tail_ids.npy", "tail_logp.npy"})
    assert cache_language(cfg, "fr", store, 64, {"c": 1}, parents, 0, log=lines.append) == meta  # up to date
    check_cache(store, ["fr"], 64, parents["teacher"], "distill")

    # A student's batch reads the rows of its very blocks: those of the teacher on the same tokens.
    tok_dir = store.fetch("tokenizer")
    teacher = CachedTeacher.load(store, ["fr"], 64)
    assert teacher.train_limit("fr") == 6 and teacher.tail == "bucket"
    batches = BalancedBatches([load_blocks(tok_dir, "train", "fr", 64, teacher.train_limit("fr"))], 4, seed=0)
    ids, _ = batches.batch(1)
    rows = teacher.rows(ids, batches.index(1))
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[:, :-1], -1)
    if top_k:
        assert rows.logp.shape == (4, 63, 5) and rows.tail_ids.shape == (4, 63, 3)
        torch.testing.assert_close(rows.logp.float(), lp.gather(-1, rows.ids.long()), atol=1e-2, rtol=1e-3)
        assert (rows.logp[..., :-1] >= rows.logp[..., 1:]).all()  # largest first
        tail = lp.scatter(-1, rows.ids.long(), float("-inf")).logsumexp(-1)
        torch.testing.assert_close(rows.log_tail, tail, atol=1e-4, rtol=1e-4)
        assert not (rows.tail_ids[..., :, None] == rows.ids[..., None, :]).any()  # from the tail, not the top k
    else:
        assert rows.ids is None and rows.logp.shape == (4, 63, model.config.vocab_size)
        torch.testing.assert_close(rows.logp.float(), lp, atol=2e-2, rtol=1e-3)


def test_check_cache_says_what_to_run(store):
    teacher = store.meta("teacher")["created"]
    with pytest.raises(MomeError, match="no cached teacher logits for 'de'.*mome teacher-logits"):
        check_cache(store, ["de"], 64, teacher, "distill")
    cache_language(LogitCacheConfig(top_k=4, tail="bucket", max_blocks=2), "de", store, 64, {}, {"teacher": "old"}, 0,
                   log=lambda *a: None)
    with pytest.raises(MomeError, match="from an older teacher"):
        check_cache(store, ["de"], 64, teacher, "moe")
    with pytest.raises(MomeError, match="blocks of 64 tokens, distill.model.n_positions is 32"):
        check_cache(store, ["de"], 32, "old", "distill")


def test_the_stage_is_skipped_cheaply_when_no_kd_run_reads_it(store, tiny_tokenized):
    import dataclasses

    from mome_ray import stages

    cfg = dataclasses.replace(tiny_tokenized, run_dir=store.location)
    cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, teacher="online"),
                              moe=dataclasses.replace(cfg.moe, teacher="online"))
    meta = stages.teacher_logits(cfg, log=lambda *a: None)
    assert "online" in meta["metrics"]["skipped"] and set(meta["files"]) == {"run_config.yaml"}
    assert meta["config"]["used_by"] == []
    with pytest.raises(MomeError, match="was skipped"):
        check_cache(store, ["en"], 64, store.meta("teacher")["created"], "distill")


def test_the_command_on_a_run_without_a_teacher_says_what_to_run(tiny_tokenized, capsys):
    from mome_ray.cli import main

    config = Path(__file__).resolve().parents[1] / "configs/tiny.yaml"
    assert main(["teacher-logits", "--config", str(config), f"run_dir={tiny_tokenized.run_dir}"]) == 2
    err = capsys.readouterr().err
    assert "no 'teacher' artifact" in err and "run 'mome teacher" in err and "Traceback" not in err
