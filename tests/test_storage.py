"""The storage layer: local folders and URIs (file:// stands in for s3:// here; the multi-node test uses a real
S3 endpoint), the meta.json contract, the node-local content-hash cache, run names, relative run dirs refused."""

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from mome_ray.artifacts import read_meta, stage_writer, write_meta
from mome_ray.cluster import resolve_run_dir, worker_env
from mome_ray.errors import MomeError
from mome_ray.launch import prepare_storage, run_name
from mome_ray.storage import RunStore


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOME_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_stage(store, stage: str, files: dict[str, bytes], fail: bool = False) -> None:
    with stage_writer(store, stage) as out:
        for rel, data in files.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(data)
        if fail:
            raise RuntimeError("killed mid-stage")
        write_meta(out, stage, {"c": 1}, {}, {}, 0)


@pytest.fixture(params=["local", "uri"])
def store(request, tmp_path):
    return RunStore(tmp_path / "run" if request.param == "local" else f"file://{tmp_path}/run")


def test_a_stage_is_published_whole_and_fetched_with_its_files(store, cache):
    write_stage(store, "tokenizer", {"vocab.json": b"{}", "tokens/train/en.npy": b"x" * 100})
    meta = read_meta(store, "tokenizer")
    assert set(meta["files"]) == {"vocab.json", "tokens/train/en.npy", "run_config.yaml"}
    local = store.fetch("tokenizer")
    assert (local / "tokens/train/en.npy").read_bytes() == b"x" * 100
    if store.remote:  # a node-local copy keyed by the meta's hash; fetched again: the same folder, no download
        assert local.parent == cache and store.fetch("tokenizer") == local
    else:
        assert local == Path(store.location) / "tokenizer"


def test_a_failed_stage_leaves_the_previous_artifact_or_none(store):
    with pytest.raises(RuntimeError):
        write_stage(store, "teacher", {"model.safetensors": b"new"}, fail=True)
    assert store.meta("teacher") is None  # nothing reads as complete
    write_stage(store, "teacher", {"model.safetensors": b"old"})
    with pytest.raises(RuntimeError):
        write_stage(store, "teacher", {"model.safetensors": b"new"}, fail=True)
    assert (store.fetch("teacher") / "model.safetensors").read_bytes() == b"old"


def test_nested_artifacts_survive_their_stage_and_show_in_a_view(store):
    write_stage(store, "experts/fr", {"model.safetensors": b"fr"})
    with stage_writer(store, "experts", nested=True) as out:
        (out / "eval.csv").write_text("model,fr\n")
        write_meta(out, "experts", {}, {}, {}, 0)
    assert store.children("experts") == ["fr"]
    assert "fr/model.safetensors" not in read_meta(store, "experts")["files"]
    with store.view(["experts", "experts/*", "moe/*"]) as run_dir:
        assert (run_dir / "experts" / "eval.csv").read_text() == "model,fr\n"
        assert (run_dir / "experts" / "fr" / "model.safetensors").read_bytes() == b"fr"
        assert not (run_dir / "moe").exists()


def test_a_publish_killed_midway_leaves_no_meta(tmp_path, monkeypatch):
    store = RunStore(f"file://{tmp_path}/run")
    write_stage(store, "teacher", {"a.bin": b"1", "b.bin": b"2"})
    calls = []

    def upload(local, rel):
        calls.append(rel)
        if len(calls) == 2:
            raise OSError("connection reset")
        RunStore.upload(store, local, rel)

    monkeypatch.setattr(store, "upload", upload)
    with pytest.raises(OSError):
        write_stage(store, "teacher", {"a.bin": b"3", "b.bin": b"4"})
    assert store.meta("teacher") is None  # the old meta went first: absent, never half old half new


def test_a_file_changed_under_its_meta_is_refused(tmp_path):
    store = RunStore(f"file://{tmp_path}/run")
    write_stage(store, "teacher", {"model.safetensors": b"weights"})
    (tmp_path / "run" / "teacher" / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(MomeError, match="does not match its meta.json"):
        store.fetch("teacher")


def _fetch(location: str) -> str:
    return str(RunStore(location).fetch("tokenizer"))


def test_processes_fetching_at_once_share_one_complete_copy(tmp_path):
    location = f"file://{tmp_path}/run"
    write_stage(RunStore(location), "tokenizer", {f"f{i}.bin": os.urandom(50_000) for i in range(20)})
    with ProcessPoolExecutor(4) as pool:
        paths = set(pool.map(_fetch, [location] * 8))
    assert len(paths) == 1
    folder = Path(paths.pop())
    assert len(list(folder.glob("f*.bin"))) == 20
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_missing_artifact_names_the_command(tmp_path):
    with pytest.raises(MomeError, match="no 'teacher' artifact .* 'mome teacher"):
        read_meta(RunStore(f"file://{tmp_path}/none"), "teacher")


def test_run_names_change_with_config_parents_and_location(tmp_path):
    a, b = RunStore(tmp_path / "a"), RunStore(f"file://{tmp_path}/a")
    name = run_name(a, "fr", {"lr": 1}, {"teacher": "t1"})
    assert name.startswith("a-fr-") and name == run_name(a, "fr", {"lr": 1}, {"teacher": "t1"})
    assert name != run_name(a, "fr", {"lr": 2}, {"teacher": "t1"})  # a changed config never resumes
    assert name != run_name(a, "fr", {"lr": 1}, {"teacher": "t2"})  # nor a re-made parent
    assert name != run_name(b, "fr", {"lr": 1}, {"teacher": "t1"})  # runs sharing storage never collide


@pytest.mark.parametrize("kind", ["local", "uri"])
def test_fresh_clears_checkpoints_on_any_filesystem(tmp_path, kind):
    storage = str(tmp_path / "ray_results") if kind == "local" else f"file://{tmp_path}/ray_results"
    assert prepare_storage(storage, "run-x", fresh=False) is False
    (tmp_path / "ray_results" / "run-x").mkdir(parents=True)
    (tmp_path / "ray_results" / "run-x" / "checkpoint_000000").mkdir()
    assert prepare_storage(storage, "run-x", fresh=False) is True  # an interrupted run: resumed
    assert prepare_storage(storage, "run-x", fresh=True) is False
    assert not (tmp_path / "ray_results" / "run-x").exists()


def test_relative_run_dir_is_refused_where_other_nodes_cannot_see_it(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert resolve_run_dir("runs/x").location == str(Path("runs/x").absolute())  # a laptop: fine
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert not resolve_run_dir("runs/x").remote
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    with pytest.raises(MomeError, match="relative path against the remote cluster.*s3://"):
        resolve_run_dir("runs/x")
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}}))
    with pytest.raises(MomeError, match="inside a Ray job.*shared"):
        resolve_run_dir("runs/x")
    assert resolve_run_dir("s3://bucket/runs/x").remote
    assert resolve_run_dir(str(tmp_path)).location == str(tmp_path)


def test_worker_env_travels_in_the_runtime_env(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    env = worker_env()
    assert env["HF_HUB_OFFLINE"] == "1" and env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert "AWS_SECRET_ACCESS_KEY" not in env  # secrets belong on the nodes, not in a job's config
    # A job's own runtime_env wins (Ray refuses to merge two values of one variable).
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "0"}}}))
    assert "HF_HUB_OFFLINE" not in worker_env()
