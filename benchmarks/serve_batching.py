"""Continuous vs static batching of generation, in one run on one local cluster: the same app deployed with
`serve.batching=continuous` (a request joins the running decode batch at the next step) and then
`serve.batching=static` (a batch starts together; a new request waits for its longest generation).

    python benchmarks/serve_batching.py --run-dir runs/small [--config configs/small.yaml] [--port 8126] [--quick]

Load: routed /v1/generate at concurrency 16 (and 4), real 40-token prompts (serve_load.py's), temperature 0,
`max_new_tokens` cycling through LENGTHS (mixed lengths are what static batching pays for). Per cell:
p50/p99 latency (send -> whole body), requests/s and generated tokens/s (the answers' completion_tokens
over the cell's wall time). Both modes use the preset's `serve.moe.max_batch_size` (the decode batch's cap);
static batching waits 5 ms for a batch to fill (STATIC_WINDOW).
Prints a markdown table and the ratios static / continuous; exits 1 if a request failed.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp  # noqa: E402

from benchmarks.serve_load import HEADER, Cell, HTTPStatus, deploy, on_app, parse_args, run_cell, warm_up  # noqa: E402

LENGTHS = (4, 64, 8, 32, 16, 48)  # max_new_tokens, cycled: prompt (<= 41) + 64 fits small's 128 positions
CONCURRENCY = (4, 16)
# Static batching's window: a batch that starts from idle waits this long for others to join (what @serve.batch
# does); the app's default of 0 would start it with whoever has queued and make static look worse than it is.
STATIC_WINDOW = "serve.moe.batch_wait_timeout_s=0.005"


def generate_call(session, url: str, prompts: list[str], made: list[int]):
    """POST routed generations of mixed lengths; add each answer's completion_tokens to `made`."""

    async def call(i: int) -> None:
        body = {"prompt": prompts[i % len(prompts)], "max_new_tokens": LENGTHS[i % len(LENGTHS)], "temperature": 0.0}
        async with session.post(url + "/v1/generate", json=body) as r:
            if r.status != 200:
                raise HTTPStatus(r.status, await r.read())
            made.append((await r.json())["completion_tokens"])

    return call


async def cells(session, url: str, prompts: list[str], mode: str, quick: bool) -> list[tuple[Cell, float]]:
    out = []
    for c in CONCURRENCY:
        made: list[int] = []
        n = 3 * c + 4 if quick else max(60, 12 * c)
        cell = await run_cell(f"generate, {mode}", generate_call(session, url, prompts, made), c, n,
                              8.0 if quick else 60.0)
        out.append((cell, sum(made) / cell.seconds))
        print(f"{cell.row()[:-1]}| {out[-1][1]:.0f} |", flush=True)
    return out


async def measure(args, url: str, prompts: list[str]) -> int:
    print(f"\n### Generate, continuous vs static batching (routed, max_new_tokens cycling {list(LENGTHS)}, "
          f"temperature 0)\n\n{HEADER[:HEADER.index(chr(10))]} tokens/s |\n{HEADER[HEADER.index(chr(10)) + 1:]}---|")
    results = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=300)) as session:
        for mode in ("continuous", "static"):
            if mode != "continuous":
                await asyncio.to_thread(deploy, args, [f"serve.batching={mode}", STATIC_WINDOW])  # serve.run blocks
            await warm_up(session, url, prompts)
            results[mode] = await cells(session, url, prompts, mode, args.quick)
    print()
    for (cont, cont_tps), (stat, stat_tps) in zip(results["continuous"], results["static"]):
        print(f"- concurrency {cont.concurrency}: p99 continuous / static = {cont.pct(99):.0f} / {stat.pct(99):.0f} ms "
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
