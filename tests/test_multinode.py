"""The two-node cluster (tests/multinode.py) is what it claims: work lands on a node that cannot see the
driver's files, S3 is the storage both share, and a client without the cluster's token is refused."""

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

ROOT_PROBE = """
import json, os, sys, ray
import pyarrow.fs

ray.init(address=sys.argv[1], logging_level="ERROR")
head = ray.get_runtime_context().get_node_id()  # the driver runs on the head

@ray.remote(num_cpus=1)
def probe(local_file, uri):
    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    with fs.open_output_stream(path) as f:
        f.write(b"from node 2")
    with fs.open_input_stream(path) as f:
        back = f.read().decode()
    return {"node": ray.get_runtime_context().get_node_id(), "sees_local_file": os.path.exists(local_file),
            "s3_roundtrip": back, "cache": os.environ.get("MOME_CACHE_DIR")}

out = ray.get(probe.remote(sys.argv[2], sys.argv[3]), timeout=120)
print(json.dumps({"head": head, **out}))
"""


def test_tasks_run_on_node_2_which_sees_s3_but_not_the_drivers_files(two_node_cluster, tmp_path):
    c = two_node_cluster
    local = tmp_path / "only-here.txt"
    local.write_text("the driver's file")
    uri = f"s3://{c.bucket}/probe/hello.txt"
    run = subprocess.run([sys.executable, "-c", ROOT_PROBE, c.address, str(local), uri], env=c.env,
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["node"] != out["head"]  # the head has no CPUs
    assert out["sees_local_file"] is False
    assert out["s3_roundtrip"] == "from node 2"
    assert out["cache"].startswith(c.temp_dirs[1])  # node 2's own cache dir
    # ... and the driver side reads what node 2 wrote.
    read = subprocess.run([sys.executable, "-c", "import boto3, sys; print(boto3.client('s3').get_object("
                           "Bucket=sys.argv[1], Key='probe/hello.txt')['Body'].read().decode())", c.bucket],
                          env=c.env, capture_output=True, text=True, timeout=60)
    assert read.stdout.strip() == "from node 2", read.stderr[-2000:]


JOB = """
import ray

ray.init()
head = ray.get_runtime_context().get_node_id()

@ray.remote(num_cpus=1)
def task():
    return ray.get_runtime_context().get_node_id(), open("shipped.txt").read()  # cwd: the job's working dir

node, text = ray.get(task.remote(), timeout=120)
print("RESULT", node != head, text)
"""


def test_a_submitted_job_ships_its_working_dir_to_node_2(two_node_cluster, tmp_path):
    """`ray job submit --working-dir`: the folder lives where node 2 cannot see it; Ray ships it there."""
    c = two_node_cluster
    (tmp_path / "job.py").write_text(JOB)
    (tmp_path / "shipped.txt").write_text("shipped")
    run = subprocess.run(["ray", "job", "submit", "--address", c.dashboard, "--working-dir", str(tmp_path), "--",
                          "python", "job.py"], env=c.env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0 and "RESULT True shipped" in run.stdout, (run.stdout + run.stderr)[-3000:]


CONNECT = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
print("connected", ray.cluster_resources())
"""


@pytest.mark.parametrize("auth", [{"RAY_AUTH_MODE": "disabled"},  # sends no token
                                  {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}],  # a wrong one
                         ids=["no-token", "wrong-token"])
def test_a_client_without_the_token_is_refused(two_node_cluster, auth):
    c = two_node_cluster
    env = {k: v for k, v in c.env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "RAY_ADDRESS")}
    try:
        run = subprocess.run([sys.executable, "-c", CONNECT, c.address], env={**env, **auth}, capture_output=True,
                             text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("a client without the token neither connected nor was refused within 90 s")
    assert run.returncode != 0 and "connected" not in run.stdout, run.stdout[-2000:]
    assert "AuthenticationError" in run.stderr and "InvalidAuthToken" in run.stderr, run.stderr[-3000:]

    # The job API refuses it too: no job can be submitted without the token ...
    for headers in ({}, {"Authorization": "Bearer " + "0" * 64}):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(f"{c.dashboard}/api/jobs/", headers=headers), timeout=30)
        assert e.value.code in (401, 403)
    # ... and accepts the cluster's.
    ok = urllib.request.Request(f"{c.dashboard}/api/jobs/", headers={"Authorization": f"Bearer {c.token}"})
    with urllib.request.urlopen(ok, timeout=30) as r:
        assert r.status == 200


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on `port` (/proc/net/tcp{,6}: hex, state 0A)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:
                raw = bytes.fromhex(addr)
                found.add(socket.inet_ntoa(raw[::-1]) if len(raw) == 4 else
                          socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))))
    return found


def test_the_dashboard_listens_on_loopback_only(two_node_cluster):
    port = int(two_node_cluster.dashboard.rsplit(":", 1)[1])
    assert listening_addresses(port) == {"127.0.0.1"}
