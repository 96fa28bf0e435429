"""Autoscaling you can see: a load ramp on loopback scales the `moe` deployment up, and back down when it ends.

    python benchmarks/serve_autoscale.py --run-dir runs/small [--config configs/small.yaml] [--port 8125] [--quick]

Starts a local Ray cluster (loopback), deploys the app without the teacher and with `serve.moe.autoscaling`
(`AUTOSCALING`: 1 to 3 replicas of 0.5 CPU, target 2 ongoing requests each, short delays so a run takes
minutes), then drives routed /v1/generate requests (16 new tokens) through the phases of `RAMP`: idle,
light, heavy, idle again. A sampler reads `serve.status()` every second. Prints the timeline (phase,
concurrency, running and starting replicas, requests answered in the last interval) and a summary: the most
replicas under load, the seconds from the heavy phase's start to the first added replica, and from the
load's end back to the minimum; latency and failures per phase. Exits 1 if it never scaled up, never came
back down, or a request failed.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from benchmarks.serve_load import APP, Cell, HTTPStatus, gen_body, on_app, parse_args, warm_up  # noqa: E402

DEPLOYMENT = "moe"
AUTOSCALING = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2, "upscale_delay_s": 3,
               "downscale_delay_s": 15, "metrics_interval_s": 1, "look_back_period_s": 3}
RAMP = [("idle", 0, 5), ("light", 2, 15), ("heavy", 16, 45), ("after", 0, 75)]  # (phase, concurrency, seconds)
QUICK_RAMP = [("idle", 0, 3), ("light", 2, 5), ("heavy", 16, 25), ("after", 0, 45)]


def replicas() -> dict[str, int]:
    """The deployment's replicas by state (RUNNING, STARTING, STOPPING, ...), from Serve's controller."""
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or DEPLOYMENT not in app.deployments:
        return {}
    return {str(k.value if hasattr(k, "value") else k): v for k, v in app.deployments[DEPLOYMENT].replica_states.items()}


async def drive(url: str, prompts: list[str], ramp) -> tuple[list[dict], dict[str, Cell]]:
    """Run the ramp; returns the sampled timeline and a Cell (latencies, failures) per phase."""
    cells = {phase: Cell(phase, c) for phase, c, _ in ramp}
    state = {"phase": ramp[0][0], "concurrency": 0, "done": 0}
    timeline: list[dict] = []
    t0 = time.perf_counter()
    stop = asyncio.Event()

    async def sampler():
        last = 0
        while not stop.is_set():
            counts = await asyncio.to_thread(replicas)
            timeline.append({"t": time.perf_counter() - t0, "phase": state["phase"], "concurrency": state["concurrency"],
                             "running": counts.get("RUNNING", 0), "starting": counts.get("STARTING", 0),
                             "stopping": counts.get("STOPPING", 0), "answered": state["done"] - last})
            last = state["done"]
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    async def worker(session, phase_end: float, cell: Cell, k: int):
        i = k
        while time.perf_counter() < phase_end:
            body = gen_body(prompts[i % len(prompts)])
            i += 7
            s = time.perf_counter()
            try:
                async with session.post(url + "/v1/generate", json=body) as r:
                    data = await r.read()
                    if r.status != 200:
                        raise HTTPStatus(r.status, data)
                cell.latencies.append(time.perf_counter() - s)
                state["done"] += 1
            except HTTPStatus as e:
                cell.failures[e.status] += 1
            except Exception as e:  # a dropped connection
                cell.failures[type(e).__name__] += 1

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=64)) as session:
        watch = asyncio.create_task(sampler())
        for phase, concurrency, seconds in ramp:
            state["phase"], state["concurrency"] = phase, concurrency
            start = time.perf_counter()
            end = start + seconds
            if concurrency:
                await asyncio.gather(*[worker(session, end, cells[phase], k) for k in range(concurrency)])
            else:
                await asyncio.sleep(seconds)
            cells[phase].seconds = time.perf_counter() - start
        stop.set()
        await watch
    return timeline, cells


def report(timeline: list[dict], cells: dict[str, Cell], ramp) -> int:
    """Print the timeline and the summary; the number of broken expectations."""
    print(f"\n### `{DEPLOYMENT}` replicas under a load ramp (autoscaling_config {json.dumps(AUTOSCALING)})\n")
    print("| t s | phase | concurrency | running | starting | stopping | answered in the last s |")
    print("|---|---|---|---|---|---|---|")
    previous = None
    for row in timeline:  # a row when something changed, and every 5 s
        key = (row["phase"], row["running"], row["starting"], row["stopping"])
        if key != previous or int(row["t"]) % 5 == 0:
            print(f"| {row['t']:.0f} | {row['phase']} | {row['concurrency']} | {row['running']} | {row['starting']} | "
                  f"{row['stopping']} | {row['answered']} |")
        previous = key
    starts = {}
    t = 0.0
    for phase, _, seconds in ramp:
        starts[phase] = t
        t += seconds
    heavy, after = starts["heavy"], starts["after"]
    most = max((r["running"] for r in timeline if heavy <= r["t"] < after), default=0)
    base = min((r["running"] for r in timeline if r["t"] < starts["light"]), default=0)
    up = next((r["t"] - heavy for r in timeline if r["t"] >= heavy and r["running"] + r["starting"] > base), None)
    down = next((r["t"] - after for r in timeline if r["t"] >= after and r["running"] == AUTOSCALING["min_replicas"]
                 and r["starting"] == 0 and r["stopping"] == 0), None)
    print("\n| phase | concurrency | answered | failed | req/s | p50 ms | p99 ms |\n|---|---|---|---|---|---|---|")
    for phase, c, _ in ramp:
        cell = cells[phase]
        if c:
            print(f"| {phase} | {c} | {cell.ok} | {sum(cell.failures.values())} {dict(cell.failures) or ''} | "
                  f"{cell.rps:.1f} | {cell.pct(50):.0f} | {cell.pct(99):.0f} |")
    failed = sum(sum(c.failures.values()) for c in cells.values())
    print(f"\n- replicas: {base} before the load, **{most} at most under the heavy phase** (max "
          f"{AUTOSCALING['max_replicas']})")
    print(f"- heavy phase start -> a replica added: {f'{up:.0f} s' if up is not None else 'never'}")
    print(f"- load end -> back to {AUTOSCALING['min_replicas']} replica: {f'{down:.0f} s' if down is not None else 'not within the run'}")
    print(f"- failed requests: {failed}")
    return (most <= base) + (down is None) + (failed > 0)


async def main_async(args, url: str, prompts: list[str]) -> int:
    async with aiohttp.ClientSession() as session:
        await warm_up(session, url, prompts)
    ramp = QUICK_RAMP if args.quick else RAMP
    timeline, cells = await drive(url, prompts, ramp)
    return report(timeline, cells, ramp)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv, __doc__, 8125, "a shorter ramp")
    overrides = ["serve.teacher=false", f"serve.moe.autoscaling={json.dumps(AUTOSCALING)}",
                 "serve.moe.max_ongoing_requests=8"]
    bad = on_app(args, overrides, main_async)
    print(f"\n[autoscale] {'OK' if not bad else f'{bad} expectation(s) broken'}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
