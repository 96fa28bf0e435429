"""`fit_many` on a real Ray head: Ctrl-C stops every running run promptly, and the same call resumes them."""

from __future__ import annotations

import _thread
import threading
import time
from pathlib import Path

import pytest

from mome_ray.cluster import RayConfig, ScalingArgs
from mome_ray.launch import TrainJob, fit_many


def _ticking_train_fn():
    """A train_fn (built here so cloudpickle ships it by value) that checkpoints every 0.3 s for up to 2
    minutes, or, resumed, reports once more from where it stood and returns."""

    def train_fn(config: dict) -> None:
        import json
        import os
        import tempfile
        import time

        import ray.train

        start, ckpt = 0, ray.train.get_checkpoint()
        if ckpt:
            with ckpt.as_directory() as d:
                start = json.load(open(os.path.join(d, "state.json")))["step"]
        step, stop_at = start, time.monotonic() + 120
        while time.monotonic() < stop_at:
            step += 1
            time.sleep(0.3)
            with tempfile.TemporaryDirectory() as d:
                json.dump({"step": step}, open(os.path.join(d, "state.json"), "w"))
                ray.train.report({"step": step, "start": start}, checkpoint=ray.train.Checkpoint.from_directory(d))
            if start:
                return

    return train_fn


def _train_workers_alive(address: str) -> list:
    from ray.util.state import list_actors

    return [a for a in list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000)
            if a.class_name in ("RayTrainWorker", "TrainController")]


def test_ctrl_c_stops_every_run_and_a_rerun_resumes_them(ray_head, tmp_path, request):
    import signal

    # The driver's Ctrl-C handler as a fresh `mome` process has it: an earlier test of this session may have
    # left one of Ray's behind (see test_a_handler_installed_by_train_or_tune_does_not_outlive_the_run).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    storage = tmp_path / "ray_results"
    ray_cfg = RayConfig(storage_path=str(storage), max_failures=0, wait_for_resources_s=60)
    fn = _ticking_train_fn()
    jobs = [TrainJob(f"tick-{i}", fn, {"i": i}, ScalingArgs(num_workers=1, cpus_per_worker=0.5)) for i in (1, 2)]

    def interrupt_once_both_checkpointed():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            # Train has registered a checkpoint of each run (what a resume reads), not only written one
            if all((storage / job.name / "checkpoint_manager_snapshot.json").is_file() for job in jobs):
                break
            time.sleep(0.5)
        interrupted["at"] = time.monotonic()
        _thread.interrupt_main()  # what Ctrl-C does to the driver

    interrupted, lines = {}, []
    threading.Thread(target=interrupt_once_both_checkpointed, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        fit_many(jobs, ray_cfg, tmp_path, log=lines.append)
    assert time.monotonic() - interrupted["at"] < 40, "stopping took too long"
    assert any("stopping tick-1, tick-2" in line for line in lines), lines
    deadline = time.monotonic() + 30
    while _train_workers_alive(ray_head["address"]) and time.monotonic() < deadline:
        time.sleep(1)
    assert not _train_workers_alive(ray_head["address"]), "a Train worker or controller survived Ctrl-C"

    out = fit_many(jobs, ray_cfg, tmp_path, log=lines.append)
    for job in jobs:
        result, resumed = out[job.name]
        assert resumed and result.metrics["start"] >= 1, result.metrics  # went on from its checkpoint
        assert Path(result.checkpoint.path).name.startswith("checkpoint_")


def test_a_handler_installed_by_train_or_tune_does_not_outlive_the_run():
    import signal

    from mome_ray.cluster import sigint_kept

    before = signal.getsignal(signal.SIGINT)
    with sigint_kept():
        signal.signal(signal.SIGINT, lambda *a: None)  # what Train's fit() / Tune's fit() leave behind
    assert signal.getsignal(signal.SIGINT) is before


def test_a_task_is_sent_whatever_print_the_driver_has(ray_head, monkeypatch):
    """Ray's log thread swaps the driver's `builtins.print` (tqdm_ray) while tasks are being sent; a task's
    arguments must not carry the driver's `print`, or the swap makes them unpicklable (a job failed so)."""
    import builtins

    from mome_ray.cluster import on_cluster
    from mome_ray.corpus.build import SPLITS, print_balance

    class Unpicklable:
        def __call__(self, *args, **kwargs):
            pass

        def __reduce__(self):
            raise TypeError("the driver's print was sent with the task")

    manifest = {"langs": ["en"], "splits": {s: {"en": {"tokens": 1}, "max_over_min": 1.0} for s in SPLITS}}
    monkeypatch.setattr(builtins, "print", Unpicklable())
    assert on_cluster(print_balance, manifest, name="balance") is None
