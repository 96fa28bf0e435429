"""Many experts on one machine: N synthetic tiny PLE experts (default 50) served by one multiplexed deployment
(`serve.multiplex`), against 4 experts, against one deployment per expert where that fits, and the cold load
of an evicted expert; in one run on one local cluster.

    python benchmarks/serve_multiplex.py --run-dir runs/small [--experts 50] [--port 8127] [--quick]

The experts: GPT-2s of 1 block x 64 wide over the run's tokenizer, seeded and untrained (serving cost does not
depend on training), saved as safetensors in a temporary run with three PLE artifacts (the first 4, the first
8, all N; no router: each request names its expert; no teacher). Layouts, redeployed in turn:
  pool of 4       4 experts, serve.multiplex=4: all loaded in the one `experts` replica
  pool of N       N experts, serve.multiplex=N: all loaded after the warm-up
  pool of N, 8    N experts, serve.multiplex=8: at most 8 loaded, least recently used evicted
  own 4 / own 8   one deployment (replica process) per expert (serve.hot = every expert)
Load per layout: /v1/generate (8 new tokens, greedy, real 40-token prompts) naming an expert spread evenly over
all of them, concurrency 8, after one warm-up request per expert. Memory: the RSS of the model replicas
(everything but the ingress, proxy and controller) after the load. Cold load (pool of N, 8): sequential
requests to an expert just used (warm) and to one evicted by 8 others since (cold).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp  # noqa: E402

from benchmarks.serve_chaos import rss_mb  # noqa: E402
from benchmarks.serve_load import (HEADER, http_post, load_prompts, parse_args, run_cell, start_cluster,  # noqa: E402
                                   stop_cluster)

CAP = 8  # serve.multiplex of the evicting layout
APP_OPTS = ["serve.model=ple", "serve.teacher=false", "serve.moe.num_cpus=0.1"]  # 8 own deployments fit 2 CPUs


def build_run(source: Path, n: int, root: Path) -> Path:
    """A run with the source's tokenizer, n tiny experts x00..., and PLE artifacts moe4/, moe8/, moe/ (all n)."""
    import torch

    from mome_ray.models import ModelConfig, build_gpt2
    from mome_ray.tokenizer import load_tokenizer

    run = root / "run"
    shutil.copytree(source / "tokenizer", run / "tokenizer")
    tok = load_tokenizer(run / "tokenizer")
    names = [f"x{i:02d}" for i in range(n)]
    for i, name in enumerate(names):
        torch.manual_seed(i)
        build_gpt2(ModelConfig(n_layer=1, n_embd=64, n_head=2, n_positions=128), len(tok), tok.eos_token_id,
                   tok.pad_token_id).save_pretrained(str(run / "experts" / name))
    for artifact, k in (("moe4", 4), ("moe8", 8), ("moe", n)):
        (run / artifact).mkdir()
        (run / artifact / "ple.json").write_text(json.dumps({"experts": {x: f"experts/{x}" for x in names[:k]},
                                                             "router": None}))
    return run


def gen_bodies(prompts: list[str], names: list[str], n: int) -> list[dict]:
    """n /v1/generate bodies: real prompts, the experts spread evenly (i * 7 % len covers them all when the
    count is not a multiple of 7), 8 greedy tokens."""
    return [{"prompt": prompts[i % len(prompts)], "expert": names[(i * 7) % len(names)], "max_new_tokens": 8,
             "temperature": 0.0} for i in range(n)]


async def timed(call, i: int) -> float:
    t = time.perf_counter()
    await call(i)
    return 1000 * (time.perf_counter() - t)


async def layout(session, url: str, prompts: list[str], names: list[str], label: str, n_req: int) -> dict:
    call = http_post(session, url, "/v1/generate", gen_bodies(prompts, names, n_req))
    for i in range(len(names)):  # one warm-up request per expert
        await call(i)
    cell = await run_cell(label, call, 8, n_req, 120.0)
    models = {k: v[0] for k, v in rss_mb().items() if k not in ("router", "ProxyActor", "ServeController")}
    print(f"{cell.row()[:-1]}| {sum(models.values()):,.0f} | {len(models)} |", flush=True)
    return {"cell": cell, "rss": sum(models.values())}


async def cold_loads(session, url: str, prompts: list[str], names: list[str], trials: int) -> tuple[list, list]:
    """Per trial: use expert t, then CAP others (t is now evicted), then time t (cold) and t again (warm)."""
    call = lambda name: http_post(session, url, "/v1/generate", gen_bodies(prompts, [name], 3))  # noqa: E731
    cold, warm = [], []
    for t in range(trials):
        target = names[t]
        others = [names[(trials + t * CAP + j) % len(names)] for j in range(CAP)]  # never a target: n > trials + CAP
        await call(target)(0)
        for other in others:
            await call(other)(0)
        cold.append(await timed(call(target), 1))
        warm.append(await timed(call(target), 2))
    return cold, warm


async def measure(args, prompts: list[str], run: Path, n: int) -> int:
    from serve.launch import start

    names = [f"x{i:02d}" for i in range(n)]
    layouts = [("pool of 4", "moe4", 4, ["serve.multiplex=4"]),
               (f"pool of {n}", "moe", n, [f"serve.multiplex={n}"]),
               (f"pool of {n}, {CAP} loaded", "moe", n, [f"serve.multiplex={CAP}"]),
               ("own 4", "moe4", 4, ["serve.multiplex=1", f"serve.hot=[{','.join(names[:4])}]"]),
               ("own 8", "moe8", 8, ["serve.multiplex=1", f"serve.hot=[{','.join(names[:8])}]"])]
    n_req = 40 if args.quick else 240
    print(f"\n### {n} tiny experts: generate (8 tokens, greedy) at concurrency 8, an expert per request spread "
          f"evenly\n\n{HEADER[:HEADER.index(chr(10))]} RSS of the model replicas MiB | replicas |\n"
          f"{HEADER[HEADER.index(chr(10)) + 1:]}---|---|", flush=True)
    out, failed = {}, 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=300)) as session:
        for label, artifact, k, overrides in layouts:
            url = await asyncio.to_thread(start, str(run), args.config, list(args.overrides) + APP_OPTS
                                          + [f"serve.artifact={artifact}"] + overrides, "127.0.0.1", args.port)
            out[label] = await layout(session, url, prompts, names[:k], label, n_req)
            failed += sum(out[label]["cell"].failures.values())
            if label == f"pool of {n}, {CAP} loaded":
                cold, warm = await cold_loads(session, url, prompts, names, 3 if args.quick else 5)
    pool4, pool_n, evicting = out["pool of 4"], out[f"pool of {n}"], out[f"pool of {n}, {CAP} loaded"]
    print(f"\n- pool of {n} vs pool of 4: p50 {pool_n['cell'].pct(50):.0f} / {pool4['cell'].pct(50):.0f} ms = "
          f"{pool_n['cell'].pct(50) / pool4['cell'].pct(50):.2f}x, p99 {pool_n['cell'].pct(99):.0f} / "
          f"{pool4['cell'].pct(99):.0f} ms = {pool_n['cell'].pct(99) / pool4['cell'].pct(99):.2f}x, RSS "
          f"{pool_n['rss']:,.0f} / {pool4['rss']:,.0f} MiB (+{(pool_n['rss'] - pool4['rss']) / (n - 4):.1f} MiB per expert)")
    for k in (4, 8):
        own = out[f"own {k}"]
        print(f"- own {k} (a replica per expert): RSS {own['rss']:,.0f} MiB = {own['rss'] / k:,.0f} MiB per expert "
              f"(x {n} experts ~ {own['rss'] / k * n / 1024:,.1f} GiB, not deployed); p50 {own['cell'].pct(50):.0f} ms, "
              f"p99 {own['cell'].pct(99):.0f} ms")
    print(f"- pool of {n} with {CAP} loaded: p50 {evicting['cell'].pct(50):.0f} ms, p99 {evicting['cell'].pct(99):.0f} "
          f"ms; cold load of an evicted expert (sequential, {len(cold)} trials): p50 {statistics.median(cold):.0f} ms "
          f"vs {statistics.median(warm):.0f} ms warm ({', '.join(f'{c:.0f}' for c in cold)} cold)")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> None:
    import argparse

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--experts", type=int, default=50, help="how many synthetic experts (at least 16)")
    known, rest = extra.parse_known_args(argv)
    args = parse_args(rest, __doc__, 8127, "a smoke run: 16 experts, a few requests per layout")
    n = 16 if args.quick else known.experts
    if n < 16:
        raise SystemExit(f"--experts {n}: at least 16 (the cold-load trials evict with {CAP} others)")
    t0 = time.perf_counter()
    prompts = load_prompts(args.run_dir, per_lang=8)
    root = Path(tempfile.mkdtemp(prefix="mplx"))
    run = build_run(Path(args.run_dir), n, root)
    temp_dir = start_cluster()
    try:
        code = asyncio.run(measure(args, prompts, run, n))
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    raise SystemExit(code)


if __name__ == "__main__":
    main()
