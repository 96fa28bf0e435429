"""Tokens/s of the Ray Train teacher loop vs a bare PyTorch loop: same model, data, steps and threads.

    python benchmarks/train_throughput.py [--run-dir runs/small] [--steps 60] [--threads 2]

Needs a run dir with a tokenizer stage (`mome tokenizer --config configs/small.yaml`). Both sides train the
`small` preset's teacher model from the same seed on the same balanced batches; both count training time
only (forward, backward, clip, step), so the ratio is the per-step cost of Ray Train + the DDP wrapper.
Wall time including start-up (Ray, worker imports) is printed too. Target: ratio >= 0.90.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mome_ray.storage import RunStore  # noqa: E402
from mome_ray.cluster import RayConfig, ScalingArgs, init_ray  # noqa: E402
from mome_ray.config import to_dict  # noqa: E402
from mome_ray.data import BalancedBatches, load_blocks  # noqa: E402
from mome_ray.models import build_gpt2  # noqa: E402
from mome_ray.settings import load_settings  # noqa: E402
from mome_ray.launch import fit  # noqa: E402
from mome_ray.teacher import train_fn_per_worker  # noqa: E402
from mome_ray.tokenizer import load_tokenizer  # noqa: E402
from mome_ray.training import Progress, build_optimizer, build_schedule, lm_train_step  # noqa: E402


def bare_loop(cfg, langs, tok_dir: Path, steps: int, threads: int, seed: int) -> float:
    """The teacher's own step function, no Ray: returns training tokens/s."""
    torch.set_num_threads(threads)
    T = cfg.model.n_positions
    batches = BalancedBatches([load_blocks(tok_dir, "train", l, T) for l in langs], cfg.train.batch_size, seed)
    tok = load_tokenizer(tok_dir)
    torch.manual_seed(seed)
    model = build_gpt2(cfg.model, len(tok), tok.eos_token_id, tok.pad_token_id)
    opt = build_optimizer(model, cfg.train)
    sched = build_schedule(opt, cfg.train)
    progress = Progress("bare", steps, cfg.train.batch_size * T, steps, enabled=False)
    model.train()
    for step in range(steps):
        ids, _ = batches.batch(step)
        progress.tick()
        lm_train_step(model, opt, sched, ids, cfg.train, torch.device("cpu"))
        progress.tock(step, {})
    return progress.tokens_per_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/small.yaml"))
    ap.add_argument("--run-dir", default=str(ROOT / "runs/small"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    s = load_settings(args.config, [f"run_dir={args.run_dir}", f"teacher.train.max_steps={args.steps}",
                                    f"teacher.train.eval_every={args.steps}", "teacher.train.eval_blocks=4",
                                    f"teacher.train.log_every={args.steps}"])
    tok_dir = Path(args.run_dir) / "tokenizer"
    if not tok_dir.is_dir():
        sys.exit(f"no tokenizer in {tok_dir}; run 'mome corpus build' and 'mome tokenizer' with this run dir first")

    t0 = time.perf_counter()
    bare = bare_loop(s.teacher, s.langs, tok_dir, args.steps, args.threads, s.seed)
    bare_wall = time.perf_counter() - t0

    t0 = time.perf_counter()
    init_ray(RayConfig())
    scaling = ScalingArgs(num_workers=1, cpus_per_worker=args.threads)
    s.teacher.scaling = scaling
    loop_config = {"teacher": to_dict(s.teacher), "langs": s.langs, "run": RunStore(args.run_dir).location,
                   "seed": s.seed, "name": "bench"}
    result, _ = fit(train_fn_per_worker, loop_config, scaling, RayConfig(), RunStore(args.run_dir), "bench-throughput",
                    keep=1, fresh=True)
    ray_tps = result.metrics["tokens_per_s"]
    ray_wall = time.perf_counter() - t0

    print(f"\nteacher model of {Path(args.config).name}: {s.teacher.model}")
    print(f"{args.steps} steps x {s.teacher.train.batch_size} x {s.teacher.model.n_positions} tokens, "
          f"{args.threads} threads\n")
    print(f"{'loop':<28}{'train tok/s':>12}{'wall s (incl. start-up)':>26}")
    print(f"{'bare PyTorch':<28}{bare:>12,.0f}{bare_wall:>26.1f}")
    print(f"{'Ray Train (1 worker)':<28}{ray_tps:>12,.0f}{ray_wall:>26.1f}")
    print(f"\nRay/bare tokens/s ratio: {ray_tps / bare:.3f}  (target >= 0.90)")


if __name__ == "__main__":
    main()
