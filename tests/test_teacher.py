"""Teacher on Ray Train: 2-worker DDP smoke run, kill-and-resume with the same command, vocab checks."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mome_ray import stages
from mome_ray.artifacts import read_meta
from mome_ray.errors import MomeError
from mome_ray.models import load_lm
from mome_ray.settings import load_settings
from tests.conftest import copy_run

ROOT = Path(__file__).resolve().parents[1]


def test_teacher_trains_on_two_workers_and_reloads(ray_head, tiny_tokenized, tmp_path):
    run_dir = copy_run(tiny_tokenized.run_dir, tmp_path / "run")
    cfg = load_settings(str(ROOT / "configs/tiny.yaml"), [f"run_dir={run_dir}", "teacher.train.max_steps=40"])
    meta = stages.teacher(cfg, log=lambda *a: None)

    m = meta["metrics"]
    assert [h["step"] for h in m["history"]] == [0, 10, 20, 30, 40]
    for lang in cfg.langs:  # validation loss falls on every language
        assert m["final"][f"val_loss/{lang}"] < m["untrained"][f"val_loss/{lang}"] - 0.3
    assert meta["parents"]["tokenizer"] == read_meta(run_dir, "tokenizer")["created"]

    # The artifact loads in plain transformers, with its tokenizer, and generates.
    model = AutoModelForCausalLM.from_pretrained(str(run_dir / "teacher"))
    tok = AutoTokenizer.from_pretrained(str(run_dir / "teacher"))
    assert (run_dir / "teacher" / "model.safetensors").is_file()
    ids = tok("The river", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 5
    assert load_lm(run_dir / "teacher", run_dir / "tokenizer").config.n_layer == cfg.teacher.model.n_layer


def test_killed_run_resumes_with_the_same_command(ray_head, tiny_tokenized, tmp_path):
    run_dir = copy_run(tiny_tokenized.run_dir, tmp_path / "run")
    cmd = [sys.executable, "-m", "jobs.train_teacher", "--config", "configs/tiny.yaml", f"run_dir={run_dir}",
           "teacher.train.max_steps=300", "teacher.train.eval_every=20", "teacher.train.log_every=300"]
    env = {**ray_head["env"], "RAY_ADDRESS": ray_head["address"]}
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    results = run_dir / "ray_results"  # the Train run: run-teacher-<fingerprint of config and parents>
    deadline = time.time() + 120
    # Kill once Ray Train has registered a checkpoint (its snapshot lists it); a checkpoint folder still
    # being written when the driver dies is not resumable, by design.
    while time.time() < deadline and not list(results.glob("run-teacher-*/checkpoint_manager_snapshot.json")):
        time.sleep(0.2)
    [storage] = results.glob("run-teacher-*")
    os.killpg(first.pid, signal.SIGKILL)  # the driver dies mid-run
    first.wait()
    assert list(storage.glob("checkpoint_*")), "no checkpoint was written before the kill"
    assert not (run_dir / "teacher").exists()  # a killed stage leaves no half artifact

    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    # The worker prints "resumed from step N", but a worker's line can still be in flight when the driver
    # exits: the evidence is the run's own record, not a log line.
    meta = read_meta(run_dir, "teacher")
    steps = [h["step"] for h in meta["metrics"]["history"]]
    assert steps == list(range(0, 301, 20)) and meta["metrics"]["resumed"] is True


def test_vocab_mismatch_is_a_clear_error(tiny_tokenized, tmp_path):
    from mome_ray.models import ModelConfig, build_gpt2

    build_gpt2(ModelConfig(n_layer=1, n_embd=16, n_head=2), vocab_size=999, eos_id=0, pad_id=1).save_pretrained(
        str(tmp_path))
    with pytest.raises(MomeError, match="vocabulary of 999 but the tokenizer .* has 512"):
        load_lm(tmp_path, Path(tiny_tokenized.run_dir) / "tokenizer")


def test_teacher_needs_a_tokenizer_first(tmp_path):
    cfg = load_settings(str(ROOT / "configs/tiny.yaml"), [f"run_dir={tmp_path}"])
    with pytest.raises(MomeError, match="no 'tokenizer' artifact .* run 'mome tokenizer"):
        stages.teacher(cfg)
