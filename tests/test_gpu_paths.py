"""GPU paths and capacity, checked without a GPU or a Ray cluster.

A "GPU-saved" checkpoint is made for real: torch.save tags every storage with `location_tag`, so tagging
them 'cuda:0' writes the file a CUDA rank writes; loading it without map_location on this CPU-only machine
fails exactly as a GPU run's export did on a CPU-only head.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.serialization

from mome_ray.cluster import RayConfig, ScalingArgs
from mome_ray.kd import frozen_teacher, teacher_dtype
from mome_ray.errors import MomeError
from mome_ray.launch import RoomWatch, export_checkpoint, slots, times_fit, wait_for_room
from mome_ray.training import process_device
from mome_ray.sweeps import max_concurrent
from mome_ray.training import TrainConfig, build_optimizer, build_schedule, load_state, save_state

# ---------------------------------------------------------------------------------------------------------
# scaling: fractional GPUs reach Ray Train's placement bundles


def test_fractional_gpus_are_in_each_workers_bundle():
    sc = ScalingArgs(num_workers=1, cpus_per_worker=2, gpus_per_worker=0.5).ray()
    assert sc.use_gpu
    # what Train V2's FixedScalingPolicy asks for, one bundle per worker
    assert sc._resources_per_worker_not_none == {"CPU": 2, "GPU": 0.5}
    whole = ScalingArgs(num_workers=4, cpus_per_worker=4, gpus_per_worker=1).ray()
    assert whole._resources_per_worker_not_none == {"CPU": 4, "GPU": 1} and whole.total_resources["GPU"] == 4


def test_cpu_scaling_asks_for_no_gpu():
    sc = ScalingArgs(num_workers=2, cpus_per_worker=1).ray()
    assert not sc.use_gpu and sc._resources_per_worker_not_none == {"CPU": 1}


@pytest.mark.parametrize("kwargs, match", [
    ({"gpus_per_worker": -1}, "gpus_per_worker"),
    ({"gpus_per_worker": 1.5}, "whole number"),
    ({"num_workers": 2, "gpus_per_worker": 0.5}, "NCCL"),
])
def test_bad_gpu_scaling_is_an_error_saying_what_to_do(kwargs, match):
    with pytest.raises(MomeError, match=match):
        ScalingArgs(**{"num_workers": 1, **kwargs})


def test_wait_limit_is_checked():
    with pytest.raises(MomeError, match="wait_for_resources_s"):
        RayConfig(wait_for_resources_s=-1)


# ---------------------------------------------------------------------------------------------------------
# capacity: pure functions of the nodes' resources


def test_slots_count_cpus_and_fractional_gpus_per_node():
    gpu_node = {"CPU": 16, "GPU": 1}
    assert slots(ScalingArgs(1, 4, 0.5), [gpu_node]) == 2  # the GPU is the limit, not the 16 CPUs
    assert slots(ScalingArgs(1, 2, 0.25), [gpu_node]) == 4
    assert slots(ScalingArgs(1, 4, 0.5), [gpu_node, gpu_node]) == 4
    assert slots(ScalingArgs(1, 1, 1), [{"CPU": 64}]) == 0  # a GPU run on a CPU-only cluster
    assert slots(ScalingArgs(2, 1), [{"CPU": 3}]) == 1


def test_a_worker_must_fit_one_node():
    assert slots(ScalingArgs(1, 4), [{"CPU": 2}] * 3) == 0  # 6 CPUs in all, no node with 4
    assert slots(ScalingArgs(2, 2), [{"CPU": 2}, {"CPU": 3}]) == 1


def test_sweep_concurrency_counts_gpus():
    need = {"CPU": 4.001, "GPU": 1}  # one KD trial: its worker + the trial's own CPU share
    assert max_concurrent(need, have={"CPU": 64, "GPU": 2}) == 2  # counting CPUs only admitted 15
    assert max_concurrent(need, have={"CPU": 64, "GPU": 16}) == 15
    assert max_concurrent(need, limit=3, have={"CPU": 64, "GPU": 16}) == 3
    assert max_concurrent({"CPU": 1.001}, have={"CPU": 2}) == 1
    assert times_fit({"CPU": 0.3}, {"CPU": 0.9}) == 3  # float sums do not lose a slot


class FakeClock:
    """time for `wait_for_room`: sleeping advances it; nothing really waits."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def test_a_run_bigger_than_the_cluster_waits_then_fails_naming_what_is_missing():
    clock, lines = FakeClock(), []
    with pytest.raises(MomeError) as e:
        wait_for_room(ScalingArgs(1, 4, 1), "expert-fr", limit_s=65, log=lines.append,
                      nodes=lambda: [{"CPU": 8}], autoscaled=lambda: False, sleep=clock.sleep, clock=clock)
    assert "expert-fr: waited 66s for 4 CPUs + 1 GPUs" in str(e.value)
    assert "8 CPUs on 1 node(s)" in str(e.value) and "ray.wait_for_resources_s" in str(e.value)
    assert clock.t >= 65  # it waited: no refusal on the first look
    assert len(lines) == 3 and all(line.startswith("[launcher] waiting for 4 CPUs + 1 GPUs") for line in lines)


def test_a_waiting_run_starts_when_a_node_joins():
    clock, lines = FakeClock(), []
    looks = iter([[{"CPU": 2}]] * 20 + [[{"CPU": 2}, {"CPU": 8, "GPU": 1}]])
    wait_for_room(ScalingArgs(1, 4, 1), "expert-fr", limit_s=600, log=lines.append, nodes=lambda: next(looks),
                  autoscaled=lambda: False, sleep=clock.sleep, clock=clock)
    assert 39 <= clock.t <= 41 and len(lines) == 2


def test_zero_limit_waits_forever_and_autoscalers_do_not_wait_here():
    clock = FakeClock()
    looks = iter([[]] * 5000 + [[{"CPU": 4}]])
    wait_for_room(ScalingArgs(1, 4), "t", limit_s=0, log=lambda _: None, nodes=lambda: next(looks),
                  autoscaled=lambda: False, sleep=clock.sleep, clock=clock)
    assert clock.t == 10000
    assert RoomWatch(ScalingArgs(1, 4, 1), "t", 1, clock=clock).has_room([], autoscaled=True)


# ---------------------------------------------------------------------------------------------------------
# checkpoints saved on a GPU rank, read on a CPU-only driver / another device


def _gpu_saved_state(tmp_path):
    """A checkpoint folder like rank 0 writes on cuda:0: a model file + train_state.pt tagged 'cuda:0'."""
    model = torch.nn.Linear(4, 4)
    train = TrainConfig(max_steps=10)
    opt = build_optimizer(model, train)
    sched = build_schedule(opt, train)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    with mock.patch.object(torch.serialization, "location_tag", lambda storage: "cuda:0"):
        save_state(tmp_path, opt, sched, step=1, history=[{"step": 1, "val_loss": 2.0}], trace={"ce": [3.0]})
    return model, opt


def test_the_fake_is_real_a_gpu_saved_state_needs_map_location(tmp_path):
    _gpu_saved_state(tmp_path)
    assert not torch.cuda.is_available()
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(tmp_path / "train_state.pt", weights_only=True)


def test_export_reads_a_gpu_saved_checkpoint_on_a_cpu_only_driver(tmp_path):
    from types import SimpleNamespace

    from ray.train import Checkpoint

    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    ckpt.mkdir()
    _gpu_saved_state(ckpt)
    state = export_checkpoint(SimpleNamespace(checkpoint=Checkpoint.from_directory(str(ckpt))), out)
    assert state == {"step": 1, "history": [{"step": 1, "val_loss": 2.0}], "trace": {"ce": [3.0]}}
    assert (out / "model.safetensors").read_bytes() == b"weights" and not (out / "train_state.pt").exists()


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_load_state_puts_optimizer_state_on_the_ranks_device(tmp_path, device):
    model, opt = _gpu_saved_state(tmp_path)
    rank_model = torch.nn.Linear(4, 4).to(device)  # "meta" stands in for this rank's cuda:N
    train = TrainConfig(max_steps=10)
    rank_opt = build_optimizer(rank_model, train)
    state = load_state(tmp_path, rank_opt, build_schedule(rank_opt, train))
    assert state["step"] == 1
    moments = [s["exp_avg"] for s in rank_opt.state.values()]
    assert len(moments) == 2 and all(m.device.type == device for m in moments)
    assert all(s["step"].device.type == "cpu" for s in rank_opt.state.values())  # torch keeps step on CPU
    if device == "cpu":
        assert torch.equal(moments[0], opt.state[model.weight]["exp_avg"])


# ---------------------------------------------------------------------------------------------------------
# devices: per Train rank (Ray's get_device), per Serve replica, and the teacher's dtype


def test_each_rank_gets_the_gpu_ray_gave_it(monkeypatch):
    """Workers call ray.train.torch.get_device(): the index of the rank's GPU among CUDA_VISIBLE_DEVICES;
    two 0.5-GPU students given GPU 3 both run on it."""
    import ray
    import ray.train.torch
    from ray.air._internal import device_manager
    from ray.air._internal.device_manager.nvidia_gpu import CUDATorchDeviceManager
    from ray.train.v2._internal.execution import train_fn_utils

    # as inside a rank's train_fn of a distributed run
    monkeypatch.setattr(train_fn_utils, "_train_fn_utils", mock.Mock(is_distributed=lambda: True))
    monkeypatch.setattr(device_manager, "_torch_device_manager", CUDATorchDeviceManager())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: ["3"])
    assert ray.train.torch.get_device() == torch.device("cuda:1")


def test_replica_device_follows_the_gpu_serve_gave_the_replica(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [3])
    assert process_device() == torch.device("cuda:1")
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])  # num_gpus: 0
    assert process_device() == torch.device("cpu")
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: ["3"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU resource but no CUDA torch
    assert process_device() == torch.device("cpu")


def test_teacher_is_bf16_only_on_cuda_with_bf16_training():
    assert teacher_dtype(torch.device("cuda:0"), bf16=True) == torch.bfloat16
    assert teacher_dtype(torch.device("cuda:0"), bf16=False) == torch.float32
    assert teacher_dtype(torch.device("cpu"), bf16=True) == torch.float32
    teacher = frozen_teacher(torch.nn.Linear(4, 4).train(), torch.device("cpu"), bf16=True)
    assert not teacher.training and teacher.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in teacher.parameters())
    meta = frozen_teacher(torch.nn.Linear(4, 4), torch.device("meta"), bf16=True)
    assert meta.weight.device.type == "meta"
