"""Shared fixtures: one real Ray head on loopback for the whole session, and an in-test corpus.

Every test is marked by cost, here, from the fixtures it uses (an explicit mark wins): `cluster` for the
two-node cluster (tests/multinode.py), `ray` for the session's Ray head, else `unit` (60 s timeout;
`make test-fast` runs only these).

The Ray head is started with `ray start --head` on 127.0.0.1 (the same kind of cluster `ray job submit`
talks to); tests connect to it as drivers. Starting Ray costs ~5-10 s, so it happens once.
The corpus is text written here (en/fr/de sentences recombined into unique lines) plus real Python files
from the interpreter's stdlib: tests never touch the network or the fetched Debian cache.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",  # local tests only
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # else Train tees every print through its logger: lines twice
    "RAY_TQDM_PATCH_PRINT": "0",  # keeps the test drivers' print plain (a job's driver still gets the swap)
}
# Ray reads some of these once, when first imported (e.g. whether 127.0.0.1 stays loopback), and a test
# module may import Ray before any fixture runs: set them now.
os.environ.update(RAY_ENV)

SENTENCES = {
    "en": [
        "The river runs through the old town and the market is on the left bank",
        "She said that the train to the coast was late again this morning",
        "It is not easy to keep a garden when the summer is this dry",
        "They have built a new bridge over the river for the people of the valley",
        "We should read the letter before we answer the questions in it",
        "He found the key under the stone that was next to the door",
        "The children were playing in the park when the rain began to fall",
        "This book is about the history of the ships that sailed from the north",
        "You can use the tool to cut the wood into smaller pieces",
        "There is a small shop at the end of the street that sells bread",
        "The teacher asked the class to write a short story about their holidays",
        "All of the lights in the house were on when we came back",
    ],
    "fr": [
        "La rivière traverse la vieille ville et le marché est sur la rive gauche",
        "Elle a dit que le train pour la côte était encore en retard ce matin",
        "Il est difficile de garder un jardin quand l'été est aussi sec",
        "Ils ont construit un nouveau pont sur la rivière pour les gens de la vallée",
        "Nous devons lire la lettre avant de répondre aux questions qu'elle pose",
        "Il a trouvé la clé sous la pierre qui était à côté de la porte",
        "Les enfants jouaient dans le parc quand la pluie a commencé à tomber",
        "Ce livre parle de l'histoire des navires qui partaient du nord",
        "Vous pouvez utiliser cet outil pour couper le bois en petits morceaux",
        "Il y a une petite boutique au bout de la rue qui vend du pain",
        "Le professeur a demandé à la classe d'écrire une histoire sur les vacances",
        "Toutes les lumières de la maison étaient allumées quand nous sommes rentrés",
    ],
    "de": [
        "Der Fluss fließt durch die alte Stadt und der Markt ist auf dem linken Ufer",
        "Sie sagte, dass der Zug an die Küste heute Morgen wieder zu spät war",
        "Es ist nicht leicht, einen Garten zu pflegen, wenn der Sommer so trocken ist",
        "Sie haben eine neue Brücke über den Fluss für die Menschen im Tal gebaut",
        "Wir sollten den Brief lesen, bevor wir auf die Fragen darin antworten",
        "Er hat den Schlüssel unter dem Stein neben der Tür gefunden",
        "Die Kinder spielten im Park, als der Regen zu fallen begann",
        "Dieses Buch handelt von der Geschichte der Schiffe, die aus dem Norden kamen",
        "Mit dem Werkzeug kann man das Holz in kleinere Stücke schneiden",
        "Am Ende der Straße gibt es einen kleinen Laden, der Brot verkauft",
        "Der Lehrer bat die Klasse, eine kurze Geschichte über die Ferien zu schreiben",
        "Alle Lichter im Haus waren an, als wir zurück kamen",
    ],
}

STDLIB_FILES = ["textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "colorsys.py", "keyword.py",
                "netrc.py", "sched.py", "graphlib.py", "numbers.py", "reprlib.py", "calendar.py", "heapq.py",
                "difflib.py", "string.py", "queue.py", "cmd.py", "codeop.py", "getopt.py", "pprint.py",
                "locale.py", "tabnanny.py", "abc.py", "operator.py", "dataclasses.py", "random.py", "statistics.py"]


def write_corpus(root: Path, docs_per_lang: int = 60, seed: int = 0) -> Path:
    """DIR/<lang>/*.txt (documents separated by blank lines) and DIR/py/*.py from the stdlib."""
    rng = random.Random(seed)
    for lang, pool in SENTENCES.items():
        (root / lang).mkdir(parents=True, exist_ok=True)
        docs = []
        for d in range(docs_per_lang):
            lines = [", ".join(rng.sample(pool, 2)) + f" ({d}.{i})." for i in range(6)]
            docs.append("\n".join(lines))
        (root / lang / "docs.txt").write_text("\n\n".join(docs) + "\n")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (root / "py").mkdir(parents=True, exist_ok=True)
    for name in STDLIB_FILES:
        shutil.copy(stdlib / name, root / "py" / name)
    return root


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


COST_MARKS = ("unit", "ray", "cluster")
UNIT_TIMEOUT_S = 60  # the others get pyproject's `timeout`


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by these marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        marked = [m.name for m in item.iter_markers() if m.name in COST_MARKS]
        if not marked:
            uses = set(item.fixturenames)  # the closure: fixtures the test's fixtures use count too
            marked = ["cluster" if "two_node_cluster" in uses else "ray" if "ray_head" in uses else "unit"]
            item.add_marker(marked[0])
        if marked[0] == "unit" and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(UNIT_TIMEOUT_S))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_head():
    """A real head started with `ray start --head` on 127.0.0.1; yields its addresses."""
    temp_dir = tempfile.mkdtemp(prefix="mr", dir="/tmp")  # short: Ray's socket paths have a length limit
    # Free ports for everything with a fixed default, so parallel test sessions coexist.
    port, dash, client, agent = (_free_port() for _ in range(4))
    # RAY_ADDRESS in the head's environment reaches every worker it spawns: Train's PlacementGroupCleaner
    # looks the cluster up by address, and with another cluster on the machine it would not know which.
    env = {**os.environ, **RAY_ENV, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "RAY_ADDRESS": f"127.0.0.1:{port}"}
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
           f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp_dir}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}", "--num-cpus=2",
           "--include-dashboard=true", "--disable-usage-stats"]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=180)
    import ray

    address = f"127.0.0.1:{port}"
    try:
        ray.init(address=address)
        yield {"address": address, "dashboard": f"http://127.0.0.1:{dash}", "temp_dir": temp_dir, "env": env}
    finally:
        ray.shutdown()
        _stop_cluster(temp_dir, port)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_cluster(temp_dir: str, port: int) -> None:
    """Kill only this head's processes; `ray stop` would kill every Ray cluster on the machine.

    Its processes name its temp dir or its port on their command line; the agents that rename themselves
    are children of those, so the whole process tree goes.
    """
    import signal

    marks = (temp_dir.encode(), f"127.0.0.1:{port}".encode())
    parent, roots = {}, set()
    for proc in Path("/proc").iterdir():
        try:
            pid = int(proc.name)
            parent[pid] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if any(m in (proc / "cmdline").read_bytes() for m in marks):
                roots.add(pid)
        except (ValueError, OSError):
            continue
    doomed = set(roots)
    while True:
        more = {p for p, pp in parent.items() if pp in doomed} - doomed
        if not more:
            break
        doomed |= more
    for pid in doomed - {os.getpid()}:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture(scope="session")
def two_node_cluster(tmp_path_factory):
    """Head (0 CPUs) + a node that cannot see the head's files + S3 on loopback; see tests/multinode.py."""
    from tests.multinode import two_node_cluster as start

    with start(tmp_path_factory.getbasetemp(), _stop_cluster) as cluster:
        yield cluster


def tiny_overrides(run_dir: Path, corpus_dir: Path, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", f"corpus.user_dir={corpus_dir}", *extra]


@pytest.fixture(scope="session")
def tiny_tokenized(tmp_path_factory, corpus_dir):
    """A run dir with corpus + tokenizer stages done on the tiny preset (shared by several tests)."""
    from mome_ray import stages
    from mome_ray.settings import load_settings

    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_settings(str(ROOT / "configs/tiny.yaml"), tiny_overrides(run_dir, corpus_dir))
    stages.corpus(cfg, log=lambda *a: None)
    stages.tokenizer(cfg, log=lambda *a: None)
    return cfg


def copy_run(run_dir: str | Path, dest: Path) -> Path:
    """A private copy of a run dir's corpus + tokenizer stages, so teacher runs don't collide."""
    for stage in ("corpus", "tokenizer"):
        shutil.copytree(Path(run_dir) / stage, dest / stage)
    return dest


@pytest.fixture(scope="session")
def tiny_teacher(ray_head, tiny_tokenized, tmp_path_factory):
    """A run dir with corpus, tokenizer, a trained tiny teacher and its logit cache (shared by distillation and MoE
    tests)."""
    from mome_ray import stages
    from mome_ray.settings import load_settings

    run_dir = copy_run(tiny_tokenized.run_dir, tmp_path_factory.mktemp("teacher_run"))
    cfg = load_settings(str(ROOT / "configs/tiny.yaml"), [f"run_dir={run_dir}"])
    stages.teacher(cfg, log=lambda *a: None)
    stages.teacher_logits(cfg, log=lambda *a: None)  # the logit cache KD runs read (or its "skipped" meta)
    return cfg


def copy_teacher_run(cfg, dest: Path) -> Path:
    """A private copy of a run dir up to the teacher stage and its logit cache."""
    copy_run(cfg.run_dir, dest)
    for stage in ("teacher", "teacher_logits"):
        shutil.copytree(Path(cfg.run_dir) / stage, dest / stage)
    return dest


# --- a servable run (tests/test_serve*.py)


@contextlib.contextmanager
def local_serve():
    """Serve's local testing mode (`serve.run(app, _local_testing_mode=True)`) as a replica would run it; Ray
    2.60's lacks two things: @serve.batch asks for a replica context (there is none) to print a warning, and
    `reconfigure` is started but not waited for, so a request could reach an expert before its model loads."""
    from ray.serve import batching
    from ray.serve._private import replica

    start = replica.UserCallableWrapper.call_reconfigure

    def call_reconfigure(self, *args, **kwargs):
        done = start(self, *args, **kwargs)  # a concurrent future in local testing mode
        done.result()
        return done

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests", lambda self: None)
        mp.setattr(replica.UserCallableWrapper, "call_reconfigure", call_reconfigure)
        yield


def wait_until_ready(url: str, timeout: float = 240, headers: dict | None = None, proc=None) -> None:
    """Poll `url`/readyz until it answers 200; fail at once, with its output, when `proc` (the server) exits."""
    import time

    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the server exited {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
        try:
            if requests.get(f"{url}/readyz", headers=headers, timeout=15).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise TimeoutError(f"the app was not ready at {url}/readyz within {timeout} s")


SERVED_LANGS = ["en", "fr", "de", "py"]


def save_lm(path: Path, tok, seed: int, n_layer: int = 1) -> Path:
    import torch

    from mome_ray.models import ModelConfig, build_gpt2

    torch.manual_seed(seed)
    model = build_gpt2(ModelConfig(n_layer=n_layer, n_embd=32, n_head=2, n_positions=64), len(tok),
                       tok.eos_token_id, tok.pad_token_id)
    model.save_pretrained(str(path))  # safetensors
    return path


def save_jeet(path: Path, tok, seed: int, common: bool) -> Path:
    """An untrained JEET (common=False) or MoE-CE (common=True) over SERVED_LANGS, as `mome moe` saves it."""
    import torch

    from mome_ray.jeet import JEETConfig, JEETModel
    from mome_ray.models import ModelConfig

    torch.manual_seed(seed)
    JEETModel(JEETConfig(SERVED_LANGS, len(tok), tok.eos_token_id, tok.pad_token_id,
                         ModelConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64), common=common)).save(path)
    return path


@pytest.fixture(scope="session")
def served_run(tiny_tokenized, corpus_dir, tmp_path_factory) -> Path:
    """The tiny tokenizer + a router trained on the in-test corpus + small untrained GPT-2 experts (serving does
    not care how well they were trained) + a teacher, with moe/ as `mome moe` writes it: ple.json, jeet/ and
    moe-ce/ (no grid.csv: `serve.model=best` serves PLE)."""
    import json

    from mome_ray import stages
    from mome_ray.settings import load_settings
    from mome_ray.tokenizer import load_tokenizer

    run_dir = copy_run(tiny_tokenized.run_dir, tmp_path_factory.mktemp("served"))
    cfg = load_settings(str(ROOT / "configs/tiny.yaml"), tiny_overrides(run_dir, corpus_dir))
    stages.router(cfg, log=lambda *a: None)
    tok = load_tokenizer(run_dir / "tokenizer")
    for i, lang in enumerate(SERVED_LANGS):
        save_lm(run_dir / "experts" / lang, tok, seed=i)
    save_lm(run_dir / "teacher", tok, seed=10, n_layer=2)
    save_lm(run_dir / "retrained-fr", tok, seed=99)  # a "new version" of the fr expert (hot update)
    (run_dir / "moe").mkdir()
    (run_dir / "moe" / "ple.json").write_text(json.dumps({"experts": {l: f"experts/{l}" for l in SERVED_LANGS},
                                                          "router": "router"}))
    save_jeet(run_dir / "moe" / "jeet", tok, seed=20, common=False)
    save_jeet(run_dir / "moe" / "moe-ce", tok, seed=21, common=True)
    return run_dir
