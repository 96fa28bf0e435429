"""Generation in process, without Serve: what `decoding.Decoder` costs per variant against the teacher, and
continuous vs static batching under a closed loop of clients; one thread, one run.

    python benchmarks/decode.py --run-dir runs/small [--quick]

Models: the run's teacher (a one-model PLE, as Serve serves it), PLE (experts/), JEET and MoE-CE (moe/),
each forced to expert fr (routed top-1 runs the same stacks). Prompts: 41 token ids; temperature 0.
  1. one request alone: 16 and 32 new tokens, mean of REPEAT runs; ratio to the teacher;
  2. what a prefill and a decode step cost by their rows (1, 4, 8, 16), best of 3: the teacher, MoE-CE
     forced to fr, and MoE-CE with its rows over en/fr/de/py in turn (routed traffic: each language's stack
     runs on its rows, the common stack and the head once over the batch); and the decode step through HF's
     GPT-2 modules instead of inference.py's blocks (the models in train mode: `small` has no dropout, so the
     arithmetic is the same; MoE-CE's head is the cached transposed one either way);
  3. CLIENTS clients in a closed loop (each sends its next request when its last one ends), max_new_tokens
     cycling LENGTHS, a decode batch of at most 8: p50/p99 latency and tokens/s, continuous vs static.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mome_ray.decoding import Decoder, GenRequest  # noqa: E402
from mome_ray.serving import load_moe  # noqa: E402

PROMPT = list(range(3, 44))
LENGTHS = (4, 64, 8, 32, 16, 48)
CLIENTS = 16
STEP_ROWS = (1, 4, 8, 16)
REPEAT = 10


def alone(moe, force: str, n: int, repeat: int) -> float:
    """Mean ms of one request of n new tokens, decoded alone."""
    t0 = time.perf_counter()
    for _ in range(repeat):
        decoder = Decoder(moe)
        decoder.add(GenRequest(PROMPT, n, 0.0), force=force)
        while decoder.busy:
            decoder.step()
    return 1000 * (time.perf_counter() - t0) / repeat


def step_cost(moe, force: str | tuple[str, ...], rows: int, steps: int = 20) -> tuple[float, float]:
    """(ms of one prefill of `rows` prompts together, ms of one decode step of `rows` running requests); a tuple
    of experts: the rows take them in turn (as routed traffic in several languages does)."""
    decoder = Decoder(moe, max_batch=rows)
    forces = force if isinstance(force, tuple) else (force,)
    for i in range(rows):
        decoder.add(GenRequest(PROMPT, steps + 4, 0.0), force=forces[i % len(forces)])
    t0 = time.perf_counter()
    decoder.step()  # every prompt prefilled (one group per expert)
    prefill = time.perf_counter() - t0
    decoder.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        decoder.step()
    return 1000 * prefill, 1000 * (time.perf_counter() - t0) / steps


def closed_loop(moe, force: str, admit: str, n_requests: int, lengths=LENGTHS, max_batch: int = 8) -> dict:
    """CLIENTS clients, each sending its next request when its last ends, until n_requests are sent."""
    decoder, started, latencies, sent, made = Decoder(moe, max_batch, admit), {}, [], 0, 0

    def send() -> None:
        nonlocal sent
        seq = decoder.add(GenRequest(PROMPT, lengths[sent % len(lengths)], 0.0), force=force)
        started[id(seq)], sent = time.perf_counter(), sent + 1

    for _ in range(CLIENTS):
        send()
    t0 = time.perf_counter()
    while decoder.busy:
        for seq, _ in decoder.step():
            made += 1
            if seq.done:
                latencies.append(1000 * (time.perf_counter() - started.pop(id(seq))))
                if sent < n_requests:
                    send()
    latencies.sort()
    return {"p50": latencies[len(latencies) // 2], "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "tps": made / (time.perf_counter() - t0)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", default="runs/small")
    p.add_argument("--quick", action="store_true", help="fewer repeats and requests")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    run = Path(args.run_dir)
    models = {"teacher": (load_moe({"teacher": run / "teacher"}, "ple"), "teacher"),
              "PLE": (load_moe({n: run / "experts" / n for n in ("en", "fr", "de", "py")}, "ple"), "fr"),
              "JEET": (load_moe({"jeet": run / "moe" / "jeet"}, "jeet"), "fr"),
              "MoE-CE": (load_moe({"moe-ce": run / "moe" / "moe-ce"}, "moe-ce"), "fr")}
    repeat, n_requests = (3, 48) if args.quick else (REPEAT, 192)
    for moe, force in models.values():  # warm up
        alone(moe, force, 4, 1)
    print(f"\n### One request alone (41-token prompt, greedy; mean of {repeat})\n")
    print("| model | 16 tokens ms | / teacher | 32 tokens ms | / teacher |\n|---|---|---|---|---|")
    base = {n: alone(*models["teacher"], n, repeat) for n in (16, 32)}
    for name, (moe, force) in models.items():
        ms = {n: base[n] if name == "teacher" else alone(moe, force, n, repeat) for n in (16, 32)}
        print(f"| {name} | {ms[16]:.1f} | {ms[16] / base[16]:.2f}x | {ms[32]:.1f} | {ms[32] / base[32]:.2f}x |",
              flush=True)
    print("\n### What a step costs by its rows (the prompts prefilled together, then decode steps)\n")
    print("| model | rows | prefill ms | decode step ms | step / 1-row step | HF's blocks: step ms | ours / HF's |\n"
          "|---|---|---|---|---|---|---|")
    for label, name, force in (("teacher", "teacher", "teacher"), ("MoE-CE, fr", "MoE-CE", "fr"),
                               ("MoE-CE, en/fr/de/py", "MoE-CE", ("en", "fr", "de", "py"))):
        one, moe = None, models[name][0]
        for rows in STEP_ROWS:
            prefill, step = min((step_cost(moe, force, rows) for _ in range(3)), key=lambda c: c[1])
            hf = min(step_cost(moe.train(), force, rows)[1] for _ in range(3))  # train mode: HF's modules
            moe.eval()
            one = one or step
            print(f"| {label} | {rows} | {prefill:.1f} | {step:.2f} | {step / one:.2f}x | {hf:.2f} | {step / hf:.2f}x |",
                  flush=True)
    print(f"\n### {CLIENTS} clients in a closed loop, max_new_tokens cycling {list(LENGTHS)}, a batch of at most 8 "
          f"({n_requests} requests)\n")
    print("| model | batching | p50 ms | p99 ms | tokens/s |\n|---|---|---|---|---|")
    out = {}
    for name in ("teacher", "MoE-CE"):
        for admit in ("continuous", "static"):
            r = out[name, admit] = closed_loop(*models[name], admit, n_requests)
            print(f"| {name} | {admit} | {r['p50']:.0f} | {r['p99']:.0f} | {r['tps']:.0f} |", flush=True)
    print()
    for name in ("teacher", "MoE-CE"):
        c, s = out[name, "continuous"], out[name, "static"]
        print(f"- {name}: continuous / static: p50 {c['p50'] / s['p50']:.2f}x, p99 {c['p99'] / s['p99']:.2f}x, "
              f"tokens/s {c['tps'] / s['tps']:.2f}x")
    c, t = out["MoE-CE", "continuous"], out["teacher", "continuous"]
    print(f"- MoE-CE / teacher, continuous: p50 {c['p50'] / t['p50']:.2f}x, tokens/s {c['tps'] / t['tps']:.2f}x")


if __name__ == "__main__":
    main()
