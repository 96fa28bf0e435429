"""A real two-node Ray cluster on this one machine, whose second node cannot see the head's files.

    head   `ray start --head --num-cpus 0` on 127.0.0.1, token authentication on
    node 2 `ray start --address ... --num-cpus 2` inside its own mount namespace (`unshare -m`), where
           tmpfs mounts hide every folder the head writes run files to: the head's Ray temp dir, pytest's
           tmp dirs, the checkout's runs/ and .cache/, and ~/.cache/mome. The code and the venv stay
           visible, as on a cluster whose nodes share one image.
    S3     moto's standalone server on 127.0.0.1, bucket `mome`: the storage every node can reach.

The head has no CPUs, so every task, Train worker, trial and replica runs on node 2, where a path the
driver wrote locally does not exist. Drive the cluster from subprocesses with `cluster.env` (`ray job
submit`, `mome ...`, `python -c`): the pytest process holds the session's other, token-less Ray head.
Needs root (mount namespaces); without it the fixture fails, it does not skip.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: `ray`, `moto_server`, `mome`
BUCKET = "mome"


@dataclass
class TwoNodeCluster:
    address: str  # the GCS, "127.0.0.1:PORT": `ray.init(address=...)`, `RAY_ADDRESS`
    dashboard: str  # "http://127.0.0.1:PORT": the job API (`ray job submit --address ...`)
    s3_endpoint: str  # "http://127.0.0.1:PORT" (moto)
    bucket: str  # an empty bucket on s3_endpoint
    env: dict[str, str]  # the whole environment a driver / client subprocess needs, token included
    token: str  # the cluster's auth token (also env["RAY_AUTH_TOKEN"])
    node2_hidden: list[str]  # folders node 2 sees as empty tmpfs mounts
    temp_dirs: list[str]  # [head's Ray temp dir, node 2's] (node 2's exists only inside its namespace)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"nothing answered at {url} within {timeout} s")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.wait(timeout=10)


WAIT_FOR_NODES = """
import sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
deadline = time.time() + float(sys.argv[2])
while len([n for n in ray.nodes() if n["Alive"]]) < 2:
    if time.time() > deadline:
        sys.exit("only %d alive node(s)" % len([n for n in ray.nodes() if n["Alive"]]))
    time.sleep(0.5)
"""


@contextmanager
def two_node_cluster(basetemp: Path, stop_cluster) -> Iterator[TwoNodeCluster]:
    """Start S3, the head and node 2; yield the addresses; kill only these processes on exit.

    `basetemp` is pytest's tmp root (hidden from node 2); `stop_cluster(temp_dir, port)` kills a head's
    process tree (conftest's `_stop_cluster`).
    """
    # Not a skip: a suite that silently drops its multi-node tests would pass without proving anything.
    if shutil.which("unshare") is None:
        pytest.fail("the two-node cluster needs `unshare` (util-linux) to give node 2 its own mounts",
                    pytrace=False)
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.fail(f"`unshare -m` is not permitted here ({probe.stderr.strip()}): the two-node cluster tests "
                    "need root (or CAP_SYS_ADMIN); run the suite as root, as CI does", pytrace=False)

    head_tmp = tempfile.mkdtemp(prefix="mrc", dir="/tmp")  # short: Ray's socket paths have a length limit
    node2_tmp = f"{head_tmp}/n2"  # made inside node 2's tmpfs over head_tmp: the head never sees it
    hidden = [head_tmp, str(basetemp), str(ROOT / "runs"), str(ROOT / ".cache"),
              str(Path.home() / ".cache" / "mome")]
    for d in hidden:
        Path(d).mkdir(parents=True, exist_ok=True)  # a mount needs a target

    s3_port, gcs, dash, client, agent, rt_agent, agent2, rt_agent2 = (free_port() for _ in range(8))
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # not the local head's settings
    env.update({
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",  # on every node and every client
        "RAY_AUTH_TOKEN": token,  # highest precedence: ~/.ray/auth_token (if any) is not used
        "RAY_ADDRESS": f"127.0.0.1:{gcs}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "MOME_CACHE_DIR": f"{head_tmp}/cache",  # the head's and drivers' own
    })
    node2_env = {**env, "MOME_CACHE_DIR": f"{node2_tmp}/cache"}

    procs: list[subprocess.Popen] = []
    logs = []  # moto's and node 2's output, in head_tmp (removed at the end)
    try:
        # --- S3 on loopback
        s3_log = open(f"{head_tmp}/moto.log", "w")
        logs.append(s3_log)
        procs.append(subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)], env=env,
                                      stdout=s3_log, stderr=subprocess.STDOUT, start_new_session=True))
        _wait_http(env["AWS_ENDPOINT_URL"], timeout=60)
        subprocess.run([sys.executable, "-c", f"import boto3; boto3.client('s3').create_bucket(Bucket='{BUCKET}')"],
                       env=env, check=True, capture_output=True, timeout=60)

        # --- the head: no CPUs, token auth on, dashboard on loopback
        head = [str(BIN / "ray"), "start", "--head", "--num-cpus=0", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={head_tmp}",
                f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
                f"--runtime-env-agent-port={rt_agent}", "--include-dashboard=true", "--disable-usage-stats"]
        out = subprocess.run(head, env=env, capture_output=True, text=True, timeout=180)
        if out.returncode != 0:
            raise RuntimeError(f"the head did not start:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")

        # --- node 2, in its own mount namespace (private propagation: the mounts stay in there)
        mounts = " && ".join(f"mkdir -p {d} && mount -t tmpfs tmpfs {d}" for d in map(shlex.quote, hidden))
        node2 = [str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1",
                 "--num-cpus=2", f"--temp-dir={node2_tmp}", f"--dashboard-agent-listen-port={agent2}",
                 f"--runtime-env-agent-port={rt_agent2}", "--disable-usage-stats", "--block"]
        script = f"{mounts} && mkdir -p {node2_tmp}/cache && exec {shlex.join(node2)}"
        node2_log = open(f"{head_tmp}/node2.log", "w")  # opened before the mounts: the head can read it
        logs.append(node2_log)
        procs.append(subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                                      env=node2_env, stdout=node2_log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        wait = subprocess.run([sys.executable, "-c", WAIT_FOR_NODES, env["RAY_ADDRESS"], "120"], env=env,
                              capture_output=True, text=True, timeout=180)
        if wait.returncode != 0:
            raise RuntimeError(f"node 2 did not join: {wait.stderr[-2000:]}\nnode 2's output:\n"
                               f"{Path(head_tmp, 'node2.log').read_text()[-2000:]}")
        yield TwoNodeCluster(address=f"127.0.0.1:{gcs}", dashboard=f"http://127.0.0.1:{dash}",
                             s3_endpoint=env["AWS_ENDPOINT_URL"], bucket=BUCKET, env=env, token=token,
                             node2_hidden=hidden, temp_dirs=[head_tmp, node2_tmp])
    finally:
        stop_cluster(head_tmp, gcs)  # node 2's processes name head_tmp/n2 or the GCS address: they go too
        for p in procs:
            _kill_group(p)
        for f in logs:
            f.close()
        shutil.rmtree(head_tmp, ignore_errors=True)
