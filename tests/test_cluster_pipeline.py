"""The product on a real 2-node cluster (tests/multinode.py): a head with no CPUs, a worker node that cannot
see the head's files, the run on S3 (moto on loopback). Every Train worker, task and replica runs on the
second node, so each of them fetched what it read from S3.

    ray job submit ... -- python -m jobs.pipeline --config configs/tiny.yaml run_dir=s3://mome/runs/x
    mome serve s3://mome/runs/x          # route / score / generate answered by replicas on node 2
    a stage killed mid-run and re-submitted resumes from its S3 checkpoint
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import wait_until_ready, write_corpus

ROOT = Path(__file__).resolve().parents[1]
RUN = "runs/pipeline"
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1800)]


def s3(cluster):
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(endpoint_override=cluster.s3_endpoint, access_key="testing", secret_key="testing",
                             region="us-east-1", scheme="http")


def s3_json(cluster, key: str) -> dict:
    with s3(cluster).open_input_stream(f"{cluster.bucket}/{key}") as f:
        return json.loads(f.read())


def submit(cluster, *args: str, wait: bool = True, timeout: float = 900) -> tuple[str, str]:
    """`ray job submit` of `python -m ARGS` from the checkout; returns (job id, logs when waited)."""
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", cluster.dashboard,
           "--working-dir", str(ROOT), "--no-wait", "--", "python", "-m", *args]
    out = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    job = re.search(r"raysubmit_\w+", out.stdout + out.stderr).group(0)
    if not wait:
        return job, ""
    return job, wait_job(cluster, job, timeout)


def job_cli(cluster, *args: str) -> str:
    out = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", *args, "--address", cluster.dashboard],
                         env=cluster.env, capture_output=True, text=True, timeout=60)
    return out.stdout + out.stderr


def wait_job(cluster, job: str, timeout: float) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = job_cli(cluster, "status", job)  # "Job '...' succeeded" (or failed, stopped)
        if re.search(r"succeeded|failed|stopped", status, re.I):
            logs = job_cli(cluster, "logs", job)
            assert re.search("succeeded", status, re.I), f"job {job}: {status}\n{logs[-4000:]}"
            return logs
        time.sleep(2)
    raise AssertionError(f"job {job} did not finish in {timeout:.0f} s:\n{job_cli(cluster, 'logs', job)[-3000:]}")


@pytest.fixture(scope="module")
def pipeline_run(two_node_cluster, tmp_path_factory):
    """The tiny pipeline submitted as a Ray job, its run and its corpus text on S3."""
    cluster = two_node_cluster
    src = write_corpus(tmp_path_factory.mktemp("corpus_src"))
    fs = s3(cluster)
    for path in src.rglob("*"):
        if path.is_file():
            with fs.open_output_stream(f"{cluster.bucket}/src/{path.relative_to(src).as_posix()}") as f:
                f.write(path.read_bytes())
    run = f"s3://{cluster.bucket}/{RUN}"
    t0 = time.perf_counter()
    _, logs = submit(cluster, "jobs.pipeline", "--config", "configs/tiny.yaml", f"run_dir={run}",
                     f"corpus.user_dir=s3://{cluster.bucket}/src", "distill.baselines=false", timeout=1500)
    return run, logs, time.perf_counter() - t0


def test_pipeline_job_runs_end_to_end_with_the_run_on_s3(two_node_cluster, pipeline_run):
    run, logs, seconds = pipeline_run
    print(f"tiny pipeline on the 2-node cluster: {seconds:.0f} s")
    for stage in ("corpus", "tokenizer", "router", "teacher", "experts", "moe", "forgetting"):
        meta = s3_json(two_node_cluster, f"{RUN}/{stage}/meta.json")
        assert meta["files"], stage  # published with its manifest
    assert s3_json(two_node_cluster, f"{RUN}/experts/fr/meta.json")["metrics"]["final"]["step"] > 0
    fs = s3(two_node_cluster)
    with fs.open_input_stream(f"{two_node_cluster.bucket}/{RUN}/report.md") as f:
        assert "## The paper's claims" in f.read().decode()
    # Train checkpoints live in the run's storage too, one folder per fingerprinted run name.
    import pyarrow.fs as pafs

    runs = fs.get_file_info(pafs.FileSelector(f"{two_node_cluster.bucket}/{RUN}/ray_results"))
    assert any(Path(i.path).name.startswith("pipeline-teacher-") for i in runs)
    assert not (ROOT / "runs" / "pipeline").exists()  # nothing was written to the head's disk


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_from_s3_answers_from_the_second_node(two_node_cluster, pipeline_run):
    run = pipeline_run[0]
    port = _free_port()
    env = {**two_node_cluster.env, "RAY_ADDRESS": two_node_cluster.address}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mome"), "serve", run, "serve.teacher=false",
                             "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, proc=proc)
        text = "Der Fluss fließt durch die alte Stadt und der Markt ist auf dem linken Ufer"
        route = requests.post(f"{url}/v1/route", json={"prompt": text}, timeout=30).json()
        assert route["results"][0]["language"] == "de", route
        score = requests.post(f"{url}/v1/score", json={"prompt": text}, timeout=30).json()
        assert score["experts"] == ["de"] and len(score["logprobs"]) > 5, score
        assert all(lp <= 0 for lp in score["logprobs"])
        gen = requests.post(f"{url}/v1/generate", json={"prompt": "def f(x):\n    return", "max_new_tokens": 8,
                                                        "seed": 1}, timeout=60).json()
        assert gen["experts"] == ["py"] and gen["completion_tokens"] >= 1, gen
        # Every replica sits on the second node: the head has no CPUs and reads nothing from its disk.
        status = subprocess.run([str(Path(sys.executable).parent / "serve"), "status", "--address",
                                 two_node_cluster.dashboard], env=env, capture_output=True, text=True, timeout=60)
        assert "HEALTHY" in status.stdout, status.stdout + status.stderr
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # what `ray job stop`, systemd and Kubernetes send
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        # Serve's apps outlive a driver killed before its shutdown: free the replicas' CPUs for the next test.
        subprocess.run([str(Path(sys.executable).parent / "serve"), "shutdown", "-y", "--address",
                        two_node_cluster.dashboard], env=env, capture_output=True, timeout=180)
    assert proc.returncode == 0, proc.stdout.read()[-3000:]  # SIGTERM took the clean shutdown path


def test_a_killed_stage_resumes_from_its_s3_checkpoint(two_node_cluster, pipeline_run):
    import pyarrow.fs as pafs

    run = pipeline_run[0]
    args = ("jobs.train_teacher", "--config", "configs/tiny.yaml", f"run_dir={run}", "teacher.train.max_steps=400",
            "teacher.train.eval_every=20", "teacher.train.log_every=400")
    fs, results = s3(two_node_cluster), f"{two_node_cluster.bucket}/{RUN}/ray_results"

    def registered() -> set[str]:  # Train runs whose checkpoint manager has registered a checkpoint
        infos = fs.get_file_info(pafs.FileSelector(results, recursive=True, allow_not_found=True))
        return {i.path.rsplit("/", 1)[0] for i in infos if i.path.endswith("checkpoint_manager_snapshot.json")}

    before = registered()  # the pipeline's own teacher run (another fingerprint: fewer steps)
    job, _ = submit(two_node_cluster, *args, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not registered() - before:
        time.sleep(1)
    assert registered() - before, "no checkpoint registered on S3 in 300 s"
    job_cli(two_node_cluster, "stop", job)  # the stage dies mid-run
    wait_stopped = time.time() + 60
    while not re.search("stopped|failed", job_cli(two_node_cluster, "status", job), re.I) and time.time() < wait_stopped:
        time.sleep(1)
    _, logs = submit(two_node_cluster, *args, timeout=600)
    assert "resumed from step" in logs
    meta = s3_json(two_node_cluster, f"{RUN}/teacher/meta.json")
    assert meta["metrics"]["resumed"] is True and meta["metrics"]["final"]["step"] == 400
