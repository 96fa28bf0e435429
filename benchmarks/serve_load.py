"""Load on the Serve app over loopback HTTP, in one run on one local cluster: throughput and p50/p99 latency
per endpoint and concurrency, the routed MoE vs the teacher, the router hop's cost, tuned vs untuned Serve.

    python benchmarks/serve_load.py --run-dir runs/small [--config configs/small.yaml] [--port 8123] [--quick]

Starts a local Ray cluster (its own temp dir, loopback), deploys the app as Serve application "mome" with
the preset's `serve:` section, runs bounded load from an aiohttp client in this process, shuts Serve and
Ray down. Prompts: real text from the run's corpus validation split, the first ~40 tokens of documents,
interleaved en/fr/de/py. Every cell stops after its request count or its time cap, whichever comes first;
latency is send -> whole body read; throughput is successful requests / the cell's wall time.

Sections (markdown tables on stdout):
  1. route, score (routed), generate (routed, 16 new tokens, temperature 0) at concurrency 1, 4, 16, 64;
  2. the routed MoE vs the teacher deployment (`"expert": "teacher"`) on the same prompts, their cells run in
     turn ROUNDS times and pooled: p50 ratios, and where each one's CPU went (ms per request by process:
     the proxy, the ingress, the models, this client);
  3. the router hop: scoring with expert fr via HTTP /v1/score, via the ingress's handle
     (`Gateway.score`, no HTTP), and via the MoE's own handle (`moe`.score on token ids, fr forced);
  4. score at concurrency 16, this app vs the same app redeployed untuned (`UNTUNED`): the ratio.
The load generator shares the machine's cores with the app: compare numbers within one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from mome_ray.cluster import init_ray  # noqa: E402

APP = "mome"
LANGS = ("en", "fr", "de", "py")
CONCURRENCY = (1, 4, 16, 64)
NEW_TOKENS = 16
ROUNDS = 3  # the MoE-vs-teacher cells, alternated
# Serve's defaults: 5 ongoing requests per replica, and no batching (a batch of one).
UNTUNED = ["serve.moe.max_ongoing_requests=5", "serve.moe.max_batch_size=1",
           "serve.router.max_ongoing_requests=5", "serve.router.max_batch_size=1"]


# --- measuring


@dataclass
class Cell:
    """One measured load: how many requests answered, failed, how long each took."""

    name: str
    concurrency: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # successful requests only
    failures: Counter = field(default_factory=Counter)  # status code or exception name -> count

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        """The q-th percentile latency in ms (nearest rank)."""
        xs = sorted(self.latencies)
        return 1000 * xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs)) - 1))] if xs else float("nan")

    def row(self) -> str:
        failed = sum(self.failures.values())
        note = f" ({dict(self.failures)})" if failed else ""
        return (f"| {self.name} | {self.concurrency} | {self.ok} / {failed}{note} | {self.rps:.1f} | "
                f"{self.pct(50):.0f} | {self.pct(99):.0f} |")


HEADER = "| load | concurrency | ok / failed | req/s | p50 ms | p99 ms |\n|---|---|---|---|---|---|"


async def run_cell(name: str, call: Callable[[int], Awaitable[None]], concurrency: int, n: int,
                   cap_s: float) -> Cell:
    """`concurrency` workers issue calls 0..n-1 until n are issued or cap_s has passed; then wait for them."""
    cell, issued = Cell(name, concurrency), 0
    t0 = time.perf_counter()

    async def worker():
        nonlocal issued
        while issued < n and time.perf_counter() - t0 < cap_s:
            i, issued = issued, issued + 1
            await timed(cell, call, i)

    await asyncio.gather(*[worker() for _ in range(concurrency)])
    cell.seconds = time.perf_counter() - t0
    return cell


async def timed(cell: Cell, call: Callable[[int], Awaitable[None]], i: int) -> None:
    """call(i), its latency or its failure recorded in `cell`."""
    s = time.perf_counter()
    try:
        await call(i)
        cell.latencies.append(time.perf_counter() - s)
    except HTTPStatus as e:
        cell.failures[e.status] += 1
    except Exception as e:  # a dropped connection, a dead replica seen through a handle
        cell.failures[type(e).__name__] += 1


class HTTPStatus(Exception):
    def __init__(self, status: int, body: bytes):
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status


def http_post(session: aiohttp.ClientSession, url: str, path: str, bodies: list[dict]):
    """A call for `run_cell`: POST bodies[i % len] to url+path; a non-200 answer raises HTTPStatus."""

    async def call(i: int) -> None:
        async with session.post(url + path, json=bodies[i % len(bodies)]) as r:
            body = await r.read()
            if r.status != 200:
                raise HTTPStatus(r.status, body)

    return call


# --- the app and its inputs


def load_prompts(run_dir: str, per_lang: int, n_tokens: int = 40) -> list[str]:
    """The first `n_tokens` tokens (as text) of `per_lang` validation documents per language, interleaved."""
    from datasets import load_from_disk

    from mome_ray.tokenizer import load_tokenizer

    tok = load_tokenizer(Path(run_dir) / "tokenizer").backend_tokenizer
    val = load_from_disk(str(Path(run_dir) / "corpus" / "data"))["val"]
    by_lang: dict[str, list[str]] = {lang: [] for lang in LANGS}
    for lang, text in zip(val["lang"], val["text"]):
        if lang in by_lang and len(by_lang[lang]) < per_lang:
            offsets = tok.encode(text, add_special_tokens=False).offsets
            if len(offsets) >= n_tokens:
                by_lang[lang].append(text[offsets[0][0]: offsets[n_tokens - 1][1]].strip())
    short = {lang: len(p) for lang, p in by_lang.items() if len(p) < per_lang}
    if short:
        raise SystemExit(f"the validation split has too few documents of >= {n_tokens} tokens: {short}")
    return [by_lang[lang][i] for i in range(per_lang) for lang in LANGS]


def start_cluster() -> str:
    """A local Ray cluster of our own (its temp dir is ours, so `ray.init` never joins someone else's)."""
    os.environ.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="rsb", dir="/tmp")
    init_ray(None, temp_dir=temp_dir)
    return temp_dir


def stop_cluster(temp_dir: str) -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def deploy(args, overrides: list[str]) -> str:
    """The app with the command line's overrides, then `overrides` (the benchmark's own: they win)."""
    from serve.launch import start

    return start(args.run_dir, args.config, list(args.overrides) + overrides, "127.0.0.1", args.port)


async def warm_up(session: aiohttp.ClientSession, url: str, prompts: list[str]) -> None:
    """One request per prompt and endpoint, and one forced to each deployment (first calls load lazily)."""
    async with session.get(url + "/v1/experts") as r:
        names = [e["name"] for e in (await r.json())["experts"]]
    calls = [http_post(session, url, "/v1/route", [{"prompt": p} for p in prompts]),
             http_post(session, url, "/v1/score", [{"prompt": p} for p in prompts]),
             http_post(session, url, "/v1/generate", [gen_body(p) for p in prompts]),
             http_post(session, url, "/v1/score", [{"prompt": prompts[0], "expert": e} for e in names]),
             http_post(session, url, "/v1/generate", [gen_body(prompts[0], e) for e in names])]
    for call in calls:
        await asyncio.gather(*[call(i) for i in range(len(prompts))])


def gen_body(prompt: str, expert: str | None = None) -> dict:
    forced = {"expert": expert} if expert else {}
    return {"prompt": prompt, "max_new_tokens": NEW_TOKENS, "temperature": 0.0, **forced}


def alive_actors() -> list:
    """The live actors of our cluster (named by its address: other clusters may run on this machine)."""
    import ray
    from ray.util.state import list_actors

    return list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")], limit=1000)


def replica_processes() -> dict[str, list[int]]:
    """Deployment name (or the proxy/controller) -> the pids of its live actors in this cluster."""
    out: dict[str, list[int]] = {}
    for a in alive_actors():
        name = a.class_name
        if name.startswith(f"ServeReplica:{APP}:"):
            out.setdefault(name.split(":")[-1], []).append(a.pid)
        elif name in ("ProxyActor", "ServeController"):
            out.setdefault(name, []).append(a.pid)
    return out


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) used so far by each Serve process group and by this load generator."""
    import psutil

    groups = {**replica_processes(), "load generator": [os.getpid()]}
    return {name: sum(sum(psutil.Process(p).cpu_times()[:2]) for p in pids) for name, pids in groups.items()}


def cpu_line(cell: Cell, used: dict[str, float]) -> str:
    """Where a cell's CPU went (`used`: CPU seconds by process group): ms per answered request, busiest first."""
    per = {n: 1000 * seconds / max(cell.ok, 1) for n, seconds in used.items()}
    shown = ", ".join(f"{n} {ms:.1f}" for n, ms in sorted(per.items(), key=lambda x: -x[1]) if ms >= 0.05)
    return f"  - {cell.name} @ {cell.concurrency}: CPU ms per request {sum(per.values()):.1f} ({shown})"


# --- the sections


async def grid(session, url, prompts, plan) -> list[Cell]:
    bodies = {"route": ("/v1/route", [{"prompt": p} for p in prompts]),
              "score": ("/v1/score", [{"prompt": p} for p in prompts]),
              "generate": ("/v1/generate", [gen_body(p) for p in prompts])}
    cells = []
    for name, (path, b) in bodies.items():
        for c in plan.concurrency:
            cells.append(await run_cell(name, http_post(session, url, path, b), c, plan.requests(c), plan.cap_s))
            print(cells[-1].row(), flush=True)
    return cells


async def moe_vs_teacher(session, url, prompts, plan, usage: list[str]) -> list[tuple[str, int, Cell, Cell]]:
    """Each (endpoint, concurrency): the routed MoE's cell and the teacher's, each the union of ROUNDS cells run
    in turn (MoE, teacher, MoE, ...: a slow spell of the machine falls on both); `usage` gets their CPU lines."""
    out = []
    for name, path, body in (("score", "/v1/score", lambda p, e: {"prompt": p, **({"expert": e} if e else {})}),
                             ("generate", "/v1/generate", gen_body)):
        for c in plan.compare_concurrency:
            calls = {label: http_post(session, url, path, [body(p, e) for p in prompts])
                     for label, e in (("routed MoE", None), ("teacher", "teacher"))}
            cells = {label: Cell(f"{name} {label}", c) for label in calls}
            used = {label: Counter() for label in calls}  # CPU seconds by process group
            for _ in range(plan.rounds):
                for label, call in calls.items():
                    before = cpu_seconds()
                    merge(cells[label], await run_cell(f"{name} {label}", call, c, plan.requests(c), plan.cap_s))
                    used[label].update({n: t - before.get(n, 0.0) for n, t in cpu_seconds().items()})
            usage.extend(cpu_line(cells[label], used[label]) for label in calls)
            print(*[cell.row() for cell in cells.values()], sep="\n", flush=True)
            out.append((name, c, *cells.values()))
    return out


def merge(into: Cell, cell: Cell) -> None:
    """Add one cell's requests and time to another of the same load."""
    into.seconds += cell.seconds
    into.latencies += cell.latencies
    into.failures.update(cell.failures)


async def router_hop(session, url, prompts, plan) -> list[Cell]:
    from ray import serve

    from mome_ray.tokenizer import load_tokenizer
    from serve.api import ScoreRequest

    tok = load_tokenizer(Path(plan.run_dir) / "tokenizer")
    ids = [[tok.eos_token_id] + tok.backend_tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
    expert = serve.get_deployment_handle("moe", app_name=APP)
    ingress = serve.get_deployment_handle("router", app_name=APP)

    async def direct(i: int) -> None:
        await expert.score.remote(ids[i % len(ids)], {"force": "fr"})

    async def via_ingress(i: int) -> None:
        await ingress.score.remote(ScoreRequest(prompt=prompts[i % len(prompts)], expert="fr"))

    http = http_post(session, url, "/v1/score", [{"prompt": p, "expert": "fr"} for p in prompts])
    cells = []
    for c in plan.compare_concurrency:
        for name, call in (("HTTP /v1/score expert=fr", http), ("ingress handle Gateway.score expert=fr", via_ingress),
                           ("moe handle score(ids) fr forced", direct)):
            cells.append(await run_cell(name, call, c, plan.requests(c), plan.cap_s))
            print(cells[-1].row(), flush=True)
    return cells


@dataclass
class Plan:
    run_dir: str
    quick: bool

    @property
    def concurrency(self) -> tuple[int, ...]:
        return (1, 16) if self.quick else CONCURRENCY

    @property
    def compare_concurrency(self) -> tuple[int, ...]:
        return (1,) if self.quick else (1, 16)

    @property
    def cap_s(self) -> float:
        return 5.0 if self.quick else 30.0

    @property
    def rounds(self) -> int:
        """The MoE-vs-teacher cells run in turn this many times each."""
        return 1 if self.quick else ROUNDS

    def requests(self, concurrency: int) -> int:
        return 2 * concurrency + 4 if self.quick else min(400, max(60, 10 * concurrency))


def ratio_line(what: str, a: float, b: float) -> str:
    return f"{what}: {a:.1f} / {b:.1f} = **{a / b:.2f}x**"


async def measure(args, url: str, prompts: list[str]) -> None:
    plan = Plan(args.run_dir, args.quick)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        await warm_up(session, url, prompts)

        print(f"\n### Throughput and latency ({len(prompts)} real prompts of 40 tokens, en/fr/de/py; generate: "
              f"{NEW_TOKENS} new tokens, temperature 0)\n\n{HEADER}", flush=True)
        await grid(session, url, prompts, plan)

        print(f"\n### Routed MoE vs the teacher deployment (same prompts)\n\n{HEADER}", flush=True)
        usage: list[str] = []
        pairs = await moe_vs_teacher(session, url, prompts, plan, usage)
        print()
        for name, c, moe, teacher in pairs:
            print(f"- {name} @ concurrency {c}: " + ratio_line("p50 ms MoE / teacher", moe.pct(50), teacher.pct(50))
                  + f"; req/s MoE / teacher = {moe.rps / teacher.rps:.2f}x")
        print("- where the CPU went (both cells pay the proxy, the ingress and the load generator):", *usage, sep="\n")

        print(f"\n### The router hop (score with expert fr forced; the direct handle gets token ids)\n\n{HEADER}",
              flush=True)
        hop = await router_hop(session, url, prompts, plan)
        print()
        for i in range(0, len(hop), 3):
            http, ingress, direct = hop[i: i + 3]
            print(f"- concurrency {http.concurrency}: p50 HTTP {http.pct(50):.1f} ms, ingress handle "
                  f"{ingress.pct(50):.1f} ms, expert handle {direct.pct(50):.1f} ms; the router hop (ingress - expert) "
                  f"{ingress.pct(50) - direct.pct(50):.1f} ms, HTTP + proxy (HTTP - ingress) "
                  f"{http.pct(50) - ingress.pct(50):.1f} ms")

        print(f"\n### Score at concurrency 16: this app vs untuned Serve ({' '.join(UNTUNED)})\n\n{HEADER}", flush=True)
        n16, cap16 = plan.requests(16) * (1 if args.quick else 2), plan.cap_s * (1 if args.quick else 1.5)
        score = http_post(session, url, "/v1/score", [{"prompt": p} for p in prompts])
        tuned = await run_cell("score, tuned (this config)", score, 16, n16, cap16)
        print(tuned.row(), flush=True)
        await asyncio.to_thread(deploy, args, UNTUNED)  # serve.run blocks: not on this event loop
        await warm_up(session, url, prompts)
        untuned = await run_cell("score, untuned", score, 16, n16, cap16)
        print(untuned.row(), flush=True)
        print("\n- " + ratio_line("req/s tuned / untuned at concurrency 16", tuned.rps, untuned.rps)
              + " (target >= 3x)")


def parse_args(argv: list[str] | None, doc: str, port: int, quick: str) -> argparse.Namespace:
    """The arguments of both Serve benchmarks (this one and serve_chaos.py)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--run-dir", default=str(ROOT / "runs" / "small"), help="a run with moe/ple.json (mome moe)")
    p.add_argument("--config", default=str(ROOT / "configs" / "small.yaml"), help="the preset (its serve: section)")
    p.add_argument("--port", type=int, default=port, help="Serve's HTTP port on 127.0.0.1")
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides of every deployment of the app, e.g. serve.moe.batch_wait_timeout_s=0")
    return p.parse_args(argv)


def on_app(args, overrides: list[str], measure):
    """Real prompts, a local cluster of our own, the app deployed with `overrides`: `measure(args, url, prompts)`'s
    result, the cluster stopped whatever happens (every Serve benchmark's main)."""
    prompts = load_prompts(args.run_dir, per_lang=8)
    temp_dir = start_cluster()
    try:
        return asyncio.run(measure(args, deploy(args, overrides), prompts))
    finally:
        stop_cluster(temp_dir)


def main(argv: list[str] | None = None) -> None:
    on_app(parse_args(argv, __doc__, 8123, "a smoke run: fewer cells, a few requests each"), [], measure)


if __name__ == "__main__":
    main()
