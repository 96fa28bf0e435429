"""Serving operations: where the bearer token comes from, models loading once per replica, and `mome serve`
stopping cleanly on SIGTERM (what `ray job stop`, systemd and Kubernetes send). The served run is
tests/conftest.py's `served_run`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from mome_ray.errors import MomeError
from mome_ray.serving import file_version, load_moe, read_token
from tests.conftest import ROOT, _free_port, local_serve, wait_until_ready

SECRET = "s3cret-never-in-a-config"


def test_the_token_comes_from_a_file_or_the_env_var_it_names(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_TOKEN", "from-env")
    assert read_token("MY_TOKEN", "") == "from-env" and read_token("", "") == ""
    (tmp_path / "token").write_text("from-file\n")
    assert read_token("MY_TOKEN", str(tmp_path / "token")) == "from-file"  # a file named wins
    with pytest.raises(MomeError, match="cannot be read here"):
        read_token("MY_TOKEN", str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(MomeError, match="is empty"):
        read_token("", str(tmp_path / "empty"))


def test_deploy_config_refuses_an_open_host_without_a_token_and_never_writes_it(served_run, tmp_path, monkeypatch):
    from serve.launch import deploy_config

    monkeypatch.delenv("MOME_SERVE_TOKEN", raising=False)
    with pytest.raises(MomeError, match="refusing to serve on 0.0.0.0 without a bearer token"):
        deploy_config(str(served_run), None, [], "0.0.0.0", 8000)
    assert deploy_config(str(served_run), None, [], "127.0.0.1")["applications"][0]["args"]["require_token"] is False

    monkeypatch.setenv("MOME_SERVE_TOKEN", SECRET)
    from_env = deploy_config(str(served_run), None, [], "0.0.0.0", 8000)
    (tmp_path / "token").write_text(SECRET)
    monkeypatch.delenv("MOME_SERVE_TOKEN")
    from_file = deploy_config(str(served_run), None, [f"serve.token_file={tmp_path / 'token'}"], "0.0.0.0", 8000)
    for config in (from_env, from_file):
        assert SECRET not in yaml.safe_dump(config) and config["applications"][0]["args"]["require_token"] is True
    assert from_file["applications"][0]["args"]["overrides"] == [f"serve.token_file={tmp_path / 'token'}"]


def test_deploy_config_lists_the_pool_and_each_hot_expert_and_bad_pool_options_are_refused(served_run):
    from serve.launch import deploy_config

    (app,) = deploy_config(str(served_run), None, ["serve.multiplex=2", "serve.hot=[py]"], "127.0.0.1")["applications"]
    deployments = {d["name"]: d["user_config"] for d in app["deployments"]}
    assert list(deployments) == ["expert-py", "experts", "teacher"]  # no `moe`: the pool serves en, fr, de
    assert list(deployments["experts"]["versions"]) == ["en", "fr", "de"] and deployments["experts"]["n_positions"] == 64
    assert list(deployments["expert-py"]["parts"]) == ["py"]
    for overrides, match in [(["serve.hot=[py]"], "set serve.multiplex"),
                             (["serve.multiplex=2", "serve.hot=[es]"], r"serve.hot: no expert \['es'\]"),
                             (["serve.multiplex=2", "serve.model=moe-ce"], "set serve.model=ple"),
                             (["serve.multiplex=-1"], "serve.multiplex is how many experts"),
                             (["serve.batching=dynamic"], "serve.batching 'dynamic' is not one of")]:
        with pytest.raises(MomeError, match=match):
            deploy_config(str(served_run), None, overrides, "127.0.0.1")


def test_an_ingress_that_must_have_a_token_refuses_to_start_without_one(served_run, monkeypatch):
    from ray import serve

    from serve.app import AppArgs, build_app

    monkeypatch.setenv("MOME_SERVE_TOKEN", "")
    app = build_app(AppArgs(run_dir=str(served_run), overrides=["serve.teacher=false"], require_token=True))
    with local_serve(), pytest.raises(Exception, match="not on loopback and this ingress replica has no bearer token"):
        serve.run(app, _local_testing_mode=True)


def test_the_moe_loads_once_in_reconfigure_and_checks_its_health(served_run, monkeypatch):
    import serve.app as app
    import serve.models

    loads = []
    monkeypatch.setattr(serve.models, "load_moe", lambda dirs, variant, device: loads.append(Path(dirs["fr"]).name)
                        or load_moe(dirs, variant, device))
    _, _, configs = app.resolve(app.AppArgs(run_dir=str(served_run)))
    moe = configs["moe"]
    new = {**moe, "parts": {**moe["parts"], "fr": {**moe["parts"]["fr"], "stage": "retrained-fr"}},
           "versions": {**moe["versions"], "fr": file_version(served_run / "retrained-fr" / "model.safetensors")}}
    with local_serve():  # @serve.batch asks for a replica context: none here either
        server = app.MoEServer.func_or_class(1)  # what Serve does: __init__, then reconfigure(user_config)
        assert loads == []
        with pytest.raises(RuntimeError, match="no model loaded"):
            asyncio.run(server.check_health())
        server.reconfigure(moe)
        server.reconfigure(dict(moe))  # the same versions again: nothing to load
        assert loads == ["fr"]
        asyncio.run(server.check_health())
        server.reconfigure(new)  # a hot update: the new version, once
    assert loads == ["fr", "retrained-fr"]
    assert {e["name"]: e["version"] for e in server.info()["experts"]}["fr"] == new["versions"]["fr"]


def test_new_batch_options_reach_the_experts_a_pool_has_loaded(served_run):
    import serve.app as app

    _, _, configs = app.resolve(app.AppArgs(run_dir=str(served_run), overrides=["serve.multiplex=2"]))
    pool_config = configs["experts"]
    with local_serve():
        pool = app.ExpertPool.func_or_class(1, 2)
        pool.reconfigure(pool_config)
        fr = pool._load(f"fr@{pool_config['versions']['fr']}")  # what a request's first use of fr does
        assert (fr.streams.decoder.max_batch, fr.streams.decoder.admit) == (pool_config["max_batch_size"], "continuous")
        pool.reconfigure({**pool_config, "max_batch_size": 3, "batching": "static"})
    assert (fr.streams.decoder.max_batch, fr.streams.decoder.admit) == (3, "static")


def test_serve_model_picks_the_variant_best_by_the_grid_and_says_why(served_run, tmp_path):
    import shutil

    from mome_ray.serving import load_spec

    run = tmp_path / "run"
    shutil.copytree(served_run, run, symlinks=True)
    assert load_spec(run).variant == "ple" and "no moe/grid.csv" in load_spec(run).why
    rows = [("PLE", "router top-1", 120.0), ("JEET", "router top-1", 110.0), ("MoE-CE", "router top-1", 90.0),
            ("MoE-CE", "router top-1 + common", 100.0), ("JEET", "expert fr forced", 10.0)]
    (run / "moe" / "grid.csv").write_text("model,row,mean_ppl\n" + "".join(f"{m},{r},{p}\n" for m, r, p in rows))
    spec = load_spec(run)  # MoE-CE is judged as trained: with its common expert (100), not without (90)
    assert spec.variant == "moe-ce" and spec.has_common and spec.members[-1] == "common"
    assert "MoE-CE 100.0, JEET 110.0, PLE 120.0" in spec.why
    jeet = load_spec(run, model="jeet")
    assert (jeet.variant, list(jeet.parts), jeet.has_common) == ("jeet", ["jeet"], False)
    shutil.rmtree(run / "moe" / "moe-ce")
    assert load_spec(run).variant == "jeet"  # only what the artifact has
    with pytest.raises(MomeError, match="serve.model=moe-ce: no MoE-CE model at .*serve serve.model=ple"):
        load_spec(run, model="moe-ce")
    with pytest.raises(MomeError, match="serve.model 'big' is not one of"):
        load_spec(run, model="big")


def test_start_up_states_a_router_that_knows_more_languages_than_the_moe(served_run, tmp_path):
    import json
    import shutil

    from mome_ray.serving import load_spec
    from serve.app import router_mismatch

    run = tmp_path / "run"
    shutil.copytree(served_run, run, symlinks=True)
    assert router_mismatch(load_spec(run)) == ""
    info = json.loads((run / "router" / "router.json").read_text())
    (run / "router" / "router.json").write_text(json.dumps({**info, "classes": info["classes"] + ["es"]}))
    assert "knows ['es'] but the served MoE has no expert" in router_mismatch(load_spec(run))
    assert "serve.artifact=moe_plus_es" in router_mismatch(load_spec(run))


# --- SIGTERM


def process_tree(root: int) -> dict[int, str]:
    """`root` and every process below it: pid -> its start time (a pid reused later has another)."""
    parent, started = {}, {}
    for proc in Path("/proc").iterdir():
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            parent[int(proc.name)], started[int(proc.name)] = int(fields[1]), fields[19]
        except (ValueError, OSError):
            continue
    tree = {root}
    while more := {p for p, pp in parent.items() if pp in tree} - tree:
        tree |= more
    return {p: started[p] for p in tree if p in started}


def still_running(procs: dict[int, str]) -> dict[int, str]:
    """Those of `procs` still running (not exited, not a zombie): pid -> command line."""
    left = {}
    for pid, start in procs.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            if fields[19] == start and fields[0] != "Z":
                left[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
        except OSError:
            continue
    return left


@pytest.mark.ray  # its own local Ray cluster and Serve app: as heavy as the session's
@pytest.mark.timeout(400)
def test_mome_serve_stops_on_sigterm_with_exit_0_and_leaves_no_process(served_run):
    port, temp = _free_port(), tempfile.mkdtemp(prefix="mt", dir="/tmp")  # short: Ray's socket paths
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": temp,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # a local cluster of its own
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mome"), "serve", str(served_run), "--port", str(port),
                             "serve.teacher=false"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    ours: dict[int, str] = {}
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", 300, proc=proc)
        ours = process_tree(proc.pid)
        assert any("raylet" in cmd for cmd in still_running(ours).values())  # it started its own cluster
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=120)[0]
        assert proc.returncode == 0 and "[serve] stopped" in out, out[-3000:]
        deadline = time.time() + 30
        while still_running(ours) and time.time() < deadline:
            time.sleep(0.5)
        assert not still_running(ours), still_running(ours)
    finally:
        for pid in still_running(ours):  # a failed test leaves nothing running either
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["rm", "-rf", temp])
