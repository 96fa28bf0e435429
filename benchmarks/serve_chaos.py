"""Fault and bad-input checks on the Serve app over loopback HTTP, bounded (about 3 minutes; --quick: 1).

    python benchmarks/serve_chaos.py --run-dir runs/small [--config configs/small.yaml] [--port 8124] [--quick] [--pool]

Two replicas of the deployment that holds the experts: `moe` (every expert in each), or with --pool the
multiplexed `experts` (serve.model=ple serve.multiplex=4: each replica loads the experts it is asked for).

Deploys the app on a local Ray cluster of its own (as benchmarks/serve_load.py does), then:
  1. a mixed stream at concurrency 8, every 5th request a client mistake (bad JSON, not UTF-8, wrong types,
     empty or oversized prompts, unknown experts or fields, max_new_tokens over the cap, a body over the
     size limit, ...): the status codes per kind; a client mistake must get a 4xx, never a 5xx, and a valid
     request a 2xx;
  2. the RSS of every Serve replica process (psutil) after warm-up, halfway through the stream and at its
     end: memory must stay flat;
  3. steady load (concurrency 8, score and generate, half of it French) while one replica actor of it
     is killed (`ray.kill`, found with `ray.util.state.list_actors`): failed requests, requests still
     failed after one client retry (0.5 s later; target 0), and the time to recovery (first failure ->
     first success of a probe that scores with expert fr, probing every 0.2 s).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from benchmarks.serve_load import APP, alive_actors, gen_body, on_app, parse_args, replica_processes, warm_up  # noqa: E402

JSON = "application/json"
RETRY_AFTER_S = 0.5
POOL = ["serve.model=ple", "serve.multiplex=4", "serve.moe.num_cpus=0.25"]  # --pool: the multiplexed experts


def malformed(prompt: str) -> list[tuple[str, str, str, bytes, str]]:
    """(kind, method, path, body, content type): client mistakes; each must be answered with a 4xx."""
    j = lambda o: json.dumps(o).encode()  # noqa: E731
    long = " ".join([prompt] * 5)  # ~200 tokens: under max_prompt_tokens, over the experts' 128-token context
    return [
        ("bad JSON", "POST", "/v1/score", b'{"prompt": "abc"', JSON),
        ("body not UTF-8", "POST", "/v1/score", b'{"prompt": "\xff\xfe\xfd"}', JSON),
        ("form body, not JSON", "POST", "/v1/generate", b"prompt=hello", "application/x-www-form-urlencoded"),
        ("text/plain body", "POST", "/v1/score", b"hello", "text/plain"),
        ("body is a list", "POST", "/v1/score", j([prompt]), JSON),
        ("prompt: number", "POST", "/v1/score", j({"prompt": 123}), JSON),
        ("max_new_tokens: string", "POST", "/v1/generate", j({"prompt": prompt, "max_new_tokens": "ten"}), JSON),
        ("prompt missing", "POST", "/v1/generate", j({"max_new_tokens": 4}), JSON),
        ("prompt empty", "POST", "/v1/score", j({"prompt": ""}), JSON),
        ("route: empty list", "POST", "/v1/route", j({"prompt": []}), JSON),
        ("route: 65 texts (max 64)", "POST", "/v1/route", j({"prompt": ["Hallo Welt"] * 65}), JSON),
        ("unknown expert", "POST", "/v1/score", j({"prompt": prompt, "expert": "xx"}), JSON),
        ("completions: unknown model", "POST", "/v1/completions", j({"model": "gpt-4", "prompt": prompt}), JSON),
        ("completions: n=2", "POST", "/v1/completions", j({"prompt": prompt, "n": 2}), JSON),
        ("expert and top_k", "POST", "/v1/generate", j({"prompt": prompt, "expert": "fr", "top_k": 2}), JSON),
        ("top_k 9 (4 experts)", "POST", "/v1/score", j({"prompt": prompt, "top_k": 9}), JSON),
        ("unknown field", "POST", "/v1/score", j({"prompt": prompt, "temperature": 1.0}), JSON),
        ("max_new_tokens 300 (cap 256)", "POST", "/v1/generate", j({"prompt": prompt, "max_new_tokens": 300}), JSON),
        ("max_new_tokens 0", "POST", "/v1/generate", j({"prompt": prompt, "max_new_tokens": 0}), JSON),
        ("prompt + max_new_tokens > context", "POST", "/v1/generate", j({"prompt": prompt, "max_new_tokens": 120}),
         JSON),
        ("score: prompt > context", "POST", "/v1/score", j({"prompt": long}), JSON),
        ("prompt 9,000 chars (max 8,000)", "POST", "/v1/score", j({"prompt": "x" * 9000}), JSON),
        ("temperature NaN", "POST", "/v1/generate", j({"prompt": prompt, "temperature": float("nan")}), JSON),
        ("top_p 0", "POST", "/v1/generate", j({"prompt": prompt, "top_p": 0}), JSON),
        ("seed -1", "POST", "/v1/generate", j({"prompt": prompt, "seed": -1}), JSON),
        ("body 1.1 MB (max 1 MB)", "POST", "/v1/score", j({"prompt": "a" * 1_100_000}), JSON),
        ("GET on a POST route", "GET", "/v1/score", b"", JSON),
        ("unknown path", "POST", "/v1/nope", j({"prompt": prompt}), JSON),
    ]


def valid(prompts: list[str]) -> list[tuple[str, str, str, bytes, str]]:
    out = []
    for i, p in enumerate(prompts):
        body = [("/v1/route", {"prompt": p}), ("/v1/score", {"prompt": p}), ("/v1/generate", gen_body(p)),
                ("/v1/completions", {"prompt": p, "max_tokens": 8, "temperature": 0})][i % 4]
        out.append((f"valid {body[0]}", "POST", body[0], json.dumps(body[1]).encode(), JSON))
    return out


async def send(session, url: str, req) -> int | str:
    """The status code, or the exception's name when no answer came."""
    _, method, path, body, ctype = req
    try:
        async with session.request(method, url + path, data=body, headers={"Content-Type": ctype}) as r:
            await r.read()
            return r.status
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return type(e).__name__


# --- memory


def rss_mb() -> dict[str, tuple[float, list[int]]]:
    import psutil

    return {name: (sum(psutil.Process(p).memory_info().rss for p in pids) / 2**20, pids)
            for name, pids in replica_processes().items()}


def print_memory(samples: list[tuple[str, dict]]) -> None:
    names = sorted(samples[0][1])
    print("\n### RSS of the Serve processes (MiB)\n")
    print("| process | " + " | ".join(s for s, _ in samples) + " | growth first -> last of the stream |")
    print("|---|" + "---|" * (len(samples) + 1))
    first, last = samples[0][1], samples[-1][1]
    for n in names:
        cells = [f"{s[n][0]:.0f}" if n in s else "-" for _, s in samples]
        print(f"| {n} | " + " | ".join(cells) + f" | {last[n][0] - first[n][0]:+.1f} |")
    total = lambda s: sum(v[0] for v in s.values())  # noqa: E731
    print("| **all** | " + " | ".join(f"{total(s):.0f}" for _, s in samples)
          + f" | {total(last) - total(first):+.1f} ({(total(last) / total(first) - 1) * 100:+.1f}%) |")


# --- the phases


async def mixed_stream(session, url: str, reqs: list, concurrency: int, cap_s: float, by_kind: dict) -> None:
    """Send reqs with `concurrency` workers (until cap_s); count statuses per kind into by_kind."""
    queue, t0 = list(reversed(reqs)), time.perf_counter()

    async def worker():
        while queue and time.perf_counter() - t0 < cap_s:
            req = queue.pop()
            by_kind[req[0]][await send(session, url, req)] += 1

    await asyncio.gather(*[worker() for _ in range(concurrency)])


def stream_plan(prompts: list[str], n: int) -> list:
    """n requests, every 5th one a client mistake (20%), kinds and prompts cycled."""
    good, bad = valid(prompts), malformed(prompts[1])
    return [bad[(i // 5) % len(bad)] if i % 5 == 4 else good[i % len(good)] for i in range(n)]


def print_statuses(by_kind: dict) -> int:
    """The table of statuses per kind; returns how many answers broke the rule (5xx, or valid and not 2xx)."""
    print("\n### Mixed stream: status codes per kind (20% client mistakes)\n")
    print("| request | count | statuses |\n|---|---|---|")
    broken = 0
    for kind, statuses in sorted(by_kind.items(), key=lambda kv: (not kv[0].startswith("valid"), kv[0])):
        counts = ", ".join(f"{s}: {c}" for s, c in sorted(statuses.items(), key=str))
        print(f"| {kind} | {sum(statuses.values())} | {counts} |")
        for s, c in statuses.items():
            ok = isinstance(s, int) and (200 <= s < 300 if kind.startswith("valid") else 400 <= s < 500)
            broken += 0 if ok else c
    total = Counter()
    for statuses in by_kind.values():
        for s, c in statuses.items():
            total[f"{s // 100}xx" if isinstance(s, int) else s] += c
    print(f"\nall answers: {dict(total)}; answers breaking the rule (5xx / no answer, a mistake not 4xx, a valid "
          f"request not 2xx): **{broken}**")
    return broken


async def kill_phase(session, url: str, prompts: list[str], seconds: float, kill_at: float, victim: str,
                     concurrency: int = 8):
    """Steady load; kill one replica of deployment `victim` at kill_at; a failed request is retried once after
    RETRY_AFTER_S."""
    import ray

    fr = prompts[1::4]  # load_prompts interleaves en, fr, de, py
    bodies = []
    for i in range(64):  # score, score, generate, generate, ...; every other prompt French
        p = fr[i % len(fr)] if i % 2 == 0 else prompts[i % len(prompts)]
        bodies.append(("/v1/score", {"prompt": p}) if (i // 2) % 2 == 0 else ("/v1/generate", gen_body(p)))
    stats, failures, latencies = Counter(), Counter(), []
    events: dict[str, float] = {}
    t0 = time.perf_counter()

    async def post(i: int) -> int | str:
        path, body = bodies[i % len(bodies)]
        return await send(session, url, ("", "POST", path, json.dumps(body).encode(), JSON))

    async def worker(w: int):
        i = w
        while time.perf_counter() - t0 < seconds:
            s = time.perf_counter()
            status = await post(i)
            latencies.append(time.perf_counter() - s)
            stats["requests"] += 1
            if status != 200:
                events.setdefault("first failure", time.perf_counter() - t0)
                failures[status] += 1
                await asyncio.sleep(RETRY_AFTER_S)
                status = await post(i)
                stats["ok after one retry" if status == 200 else "failed after one retry"] += 1
                if status != 200:
                    failures[f"retry: {status}"] += 1
            i += concurrency

    async def killer():
        await asyncio.sleep(kill_at)
        actors = [a for a in await asyncio.to_thread(alive_actors) if a.class_name == f"ServeReplica:{APP}:{victim}"]
        actor = actors[0]
        events["kill"] = time.perf_counter() - t0
        ray.kill(ray.get_actor(actor.name, namespace="serve"), no_restart=True)
        print(f"[chaos] killed {actor.name} (pid {actor.pid}) at {events['kill']:.1f} s", flush=True)
        body = json.dumps({"prompt": fr[0], "expert": "fr"}).encode()
        while time.perf_counter() - t0 < seconds + 60:  # probe until the expert answers again
            status = await send(session, url, ("", "POST", "/v1/score", body, JSON))
            if status == 200:
                events["probe ok"] = time.perf_counter() - t0
                break
            events.setdefault("first probe failure", time.perf_counter() - t0)
            await asyncio.sleep(0.2)
        return actor.pid

    killed_pid, *_ = await asyncio.gather(killer(), *[worker(w) for w in range(concurrency)])
    stats["p50 ms"], stats["max ms"] = [1000 * sorted(latencies)[int(q * (len(latencies) - 1))] for q in (0.5, 1)]
    stats["waited > 1 s"] = sum(x > 1 for x in latencies)
    return stats, failures, events, killed_pid


async def run(args, url: str, prompts: list[str]) -> int:
    n_half, cap, kill_s = (70, 20, 20) if args.quick else (1000, 90, 45)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        await warm_up(session, url, prompts)
        by_kind: dict[str, Counter] = defaultdict(Counter)
        await mixed_stream(session, url, stream_plan(prompts, 20), 4, cap, defaultdict(Counter))  # warm the error paths
        samples = [("after warm-up", rss_mb())]
        plan = stream_plan(prompts, 2 * n_half)
        t0 = time.perf_counter()
        await mixed_stream(session, url, plan[:n_half], 8, cap, by_kind)
        samples.append(("halfway", rss_mb()))
        await mixed_stream(session, url, plan[n_half:], 8, cap, by_kind)
        samples.append(("end of stream", rss_mb()))
        print(f"[chaos] mixed stream: {sum(sum(c.values()) for c in by_kind.values())} requests in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        broken = print_statuses(by_kind)
        print_memory(samples)

        stats, failures, events, killed_pid = await kill_phase(session, url, prompts, kill_s, kill_s / 3, args.victim)
    new = replica_processes().get(args.victim, [])
    print(f"\n### Killing one {args.victim} replica under load (concurrency 8, {kill_s} s, killed at {kill_s / 3:.0f} s)\n")
    print("| measure | value |\n|---|---|")
    print(f"| requests (first tries) | {stats['requests']} |")
    print(f"| failed on the first try | {sum(v for k, v in failures.items() if not str(k).startswith('retry'))} "
          f"({', '.join(f'{k}: {v}' for k, v in failures.items()) or 'none'}) |")
    print(f"| first-try latency p50 / max; requests that waited > 1 s | {stats['p50 ms']:.0f} ms / "
          f"{stats['max ms']:.0f} ms; {stats['waited > 1 s']} |")
    print(f"| ok after one retry ({RETRY_AFTER_S} s later) | {stats['ok after one retry']} |")
    print(f"| **failed after one retry** (target 0) | **{stats['failed after one retry']}** |")
    kill, first, ok = events.get("kill"), events.get("first failure"), events.get("probe ok")
    first_any = min([t for t in (first, events.get("first probe failure")) if t is not None], default=None)
    print(f"| kill -> first failure | {f'{first_any - kill:.2f} s' if first_any is not None else 'no failure'} |")
    print(f"| kill -> expert fr answers a probe | {f'{ok - kill:.2f} s' if ok else 'never'} |")
    print(f"| time to recovery (first failure -> probe ok) | "
          f"{f'{ok - first_any:.2f} s' if ok and first_any is not None else 'n/a'} |")
    print(f"| {args.victim} replica pid before / after | {killed_pid} / {', '.join(map(str, new)) or 'none alive'} |")
    return broken + stats["failed after one retry"]


def main(argv: list[str] | None = None) -> None:
    import argparse

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--pool", action="store_true", help="the experts multiplexed (serve.multiplex=4, PLE)")
    known, rest = extra.parse_known_args(argv)
    args = parse_args(rest, __doc__, 8124, "a smoke run: a short stream and a short kill phase")
    args.victim = "experts" if known.pool else "moe"
    # two replicas of the experts' deployment: one is killed, the other answers while Serve replaces it
    bad = on_app(args, ["serve.teacher=false", "serve.moe.num_replicas=2"] + (POOL if known.pool else []), run)
    print(f"\n[chaos] {'OK' if not bad else f'{bad} answers broke a rule'}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
