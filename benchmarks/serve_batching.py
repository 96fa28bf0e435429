"""Continuous vs static batching of generation, in one run on one local cluster: the same app deployed with
`serve.batching=continuous` (a request joins the running decode batch at the next step) and then
`serve.batching=static` (a batch starts together; a new request waits for its longest generation).

    python benchmarks/serve_batching.py --run-dir runs/small [--config configs/small.yaml] [--port 8126] [--quick]

Load: routed /v1/generate, real 40-token prompts (serve_load.py's), temperature 0, `max_new_tokens` cycling
through LENGTHS (mixed lengths are what static batching pays for), two ways:
- closed loop at concurrency 16 (and 4): each client sends its next request when its last ends; under
  static batching a request that arrives while a batch runs waits for the batch's longest generation;
- open loop: requests arrive as a Poisson process (the same seeded arrival times in both modes) at
  OPEN_LOAD x the closed-loop concurrency-16 throughput continuous batching reached in this run, each sent
  when it arrives whatever is in flight (how traffic from many independent users arrives); the table's
  concurrency column is then the mean number in flight (Little's law: the latencies' sum / the wall time).
Per cell: p50/p99 latency (send -> whole body), requests/s and generated tokens/s (the answers'
completion_tokens over the cell's wall time). Both modes use the preset's `serve.moe.max_batch_size` (the
decode batch's cap); static batching waits 5 ms for a batch to fill (STATIC_WINDOW).
Prints a markdown table and the ratios continuous / static; exits 1 if a request failed.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp  # noqa: E402

from benchmarks.serve_load import (HEADER, Cell, HTTPStatus, deploy, on_app, parse_args, run_cell, timed,  # noqa: E402
                                   warm_up)

LENGTHS = (4, 64, 8, 32, 16, 48)  # max_new_tokens, cycled: prompt (<= 41) + 64 fits small's 128 positions
CONCURRENCY = (4, 16)
# Static batching's window: a batch that starts from idle waits this long for others to join (what @serve.batch
# does); the app's default of 0 would start it with whoever has queued and make static look worse than it is.
STATIC_WINDOW = "serve.moe.batch_wait_timeout_s=0.005"
OPEN_LOAD = 0.6  # the open loop's arrival rate, as a fraction of continuous batching's closed-loop rate at 16


def generate_call(session, url: str, prompts: list[str], made: list[int]):
    """POST routed generations of mixed lengths; add each answer's completion_tokens to `made`."""

    async def call(i: int) -> None:
        body = {"prompt": prompts[i % len(prompts)], "max_new_tokens": LENGTHS[i % len(LENGTHS)], "temperature": 0.0}
        async with session.post(url + "/v1/generate", json=body) as r:
            if r.status != 200:
                raise HTTPStatus(r.status, await r.read())
            made.append((await r.json())["completion_tokens"])

    return call


async def run_open(name: str, call, rate: float, n: int, cap_s: float, seed: int = 0) -> Cell:
    """Calls 0..n-1 sent at Poisson arrival times of `rate`/s (seeded: every mode gets the same ones), each when
    it arrives whatever is in flight, none after cap_s; the cell's concurrency: the mean number in flight."""
    rng, at, times = random.Random(seed), 0.0, []
    while len(times) < n and (at := at + rng.expovariate(rate)) < cap_s:
        times.append(at)
    cell = Cell(name, 0)
    t0 = time.perf_counter()

    async def one(i: int, start: float) -> None:
        await asyncio.sleep(max(0.0, t0 + start - time.perf_counter()))
        await timed(cell, call, i)

    await asyncio.gather(*[one(i, start) for i, start in enumerate(times)])
    cell.seconds = time.perf_counter() - t0
    cell.concurrency = round(sum(cell.latencies) / cell.seconds)
    return cell


async def cells(session, url: str, prompts: list[str], mode: str, quick: bool,
                rate: float | None) -> tuple[list[tuple[Cell, float]], float]:
    """The closed-loop cells, then the open loop at `rate` req/s (None: OPEN_LOAD x this mode's rate at 16);
    each cell with its tokens/s, and the open loop's rate."""
    out = []
    for c in CONCURRENCY:
        made: list[int] = []
        n = 3 * c + 4 if quick else max(60, 12 * c)
        cell = await run_cell(f"generate, {mode}", generate_call(session, url, prompts, made), c, n,
                              8.0 if quick else 60.0)
        out.append((cell, sum(made) / cell.seconds))
        print(f"{cell.row()[:-1]}| {out[-1][1]:.0f} |", flush=True)
    rate = rate or OPEN_LOAD * out[-1][0].rps
    made = []
    cell = await run_open(f"generate, {mode}, open loop {rate:.1f} req/s", generate_call(session, url, prompts, made),
                          rate, 40 if quick else 400, 8.0 if quick else 60.0)
    out.append((cell, sum(made) / cell.seconds))
    print(f"{cell.row()[:-1]}| {out[-1][1]:.0f} |", flush=True)
    return out, rate


async def measure(args, url: str, prompts: list[str]) -> int:
    print(f"\n### Generate, continuous vs static batching (routed, max_new_tokens cycling {list(LENGTHS)}, "
          f"temperature 0)\n\n{HEADER[:HEADER.index(chr(10))]} tokens/s |\n{HEADER[HEADER.index(chr(10)) + 1:]}---|")
    results, rate = {}, None
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=300)) as session:
        for mode in ("continuous", "static"):
            if mode != "continuous":
                await asyncio.to_thread(deploy, args, [f"serve.batching={mode}", STATIC_WINDOW])  # serve.run blocks
            await warm_up(session, url, prompts)
            results[mode], rate = await cells(session, url, prompts, mode, args.quick, rate)
    print()
    loads = [f"concurrency {c}" for c in CONCURRENCY] + [f"open loop {rate:.1f} req/s"]  # as `cells` runs them
    for load, (cont, cont_tps), (stat, stat_tps) in zip(loads, results["continuous"], results["static"]):
        if load.startswith("open"):
            load += f" (mean in flight {cont.concurrency} / {stat.concurrency})"
        print(f"- {load}: p99 continuous / static = {cont.pct(99):.0f} / {stat.pct(99):.0f} ms "
              f"= **{cont.pct(99) / stat.pct(99):.2f}x** (target <= 0.5x at 16); p50 {cont.pct(50):.0f} / "
              f"{stat.pct(50):.0f} ms = {cont.pct(50) / stat.pct(50):.2f}x; tokens/s {cont_tps:.0f} / {stat_tps:.0f} "
              f"= {cont_tps / stat_tps:.2f}x")
    failed = sum(sum(c.failures.values()) for cells_ in results.values() for c, _ in cells_)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> None:
    t0 = time.perf_counter()
    args = parse_args(argv, __doc__, 8126, "a smoke run: a few requests per cell")
    code = on_app(args, ["serve.batching=continuous"], measure)
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    raise SystemExit(code)


if __name__ == "__main__":
    main()
