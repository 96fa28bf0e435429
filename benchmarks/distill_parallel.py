"""Wall time of distilling the experts concurrently vs one after another, on the same cluster, in one run.

    python benchmarks/distill_parallel.py [--run-dir runs/small] [--steps 40] [--langs en fr de py]

Needs a run dir with a teacher (`mome teacher --config configs/small.yaml`). Both sides train the same
experts (the `small` preset's students, baselines off, `--steps` each) from scratch into scratch copies of
the run dir: once through `fit_many` with as many runs at once as the cluster fits, once with one at a time.
Prints each side's wall time, the machine's CPU utilisation while it ran (from /proc/stat), and the ratio.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mome_ray.cluster import init_ray  # noqa: E402
from mome_ray.distill import distill_students  # noqa: E402
from mome_ray.stages import parents_of  # noqa: E402
from mome_ray.storage import RunStore  # noqa: E402
from mome_ray.settings import load_settings  # noqa: E402


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def timed(cfg, run_dir: Path, max_parallel: int) -> tuple[float, float]:
    """Distil the experts into a scratch copy of the run dir; returns (wall seconds, CPU utilisation)."""
    for stage in ("corpus", "tokenizer", "teacher"):
        shutil.copytree(Path(cfg.run_dir) / stage, run_dir / stage)
    cfg.distill.max_parallel = max_parallel
    busy0, total0 = cpu_times()
    t0 = time.perf_counter()
    distill_students(cfg.distill, cfg.langs, RunStore(run_dir), cfg.ray, parents_of(RunStore(run_dir), "experts"), cfg.seed, fresh=True, log=lambda *a: None)
    wall = time.perf_counter() - t0
    busy1, total1 = cpu_times()
    return wall, (busy1 - busy0) / max(1, total1 - total0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/small")
    p.add_argument("--config", default=str(ROOT / "configs/small.yaml"))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--langs", nargs="*", default=None, help="experts to train (default: every language)")
    args = p.parse_args()

    cfg = load_settings(args.config, [f"run_dir={args.run_dir}", f"distill.train.max_steps={args.steps}",
                                      f"distill.train.eval_every={args.steps}", "distill.baselines=false",
                                      f"distill.train.log_every={args.steps}"])
    if args.langs:
        cfg.distill.langs = args.langs
    init_ray(cfg.ray)
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    n = len(cfg.distill.langs or cfg.langs)
    print(f"{n} experts x {args.steps} steps, {cfg.distill.scaling.num_workers} worker x "
          f"{cfg.distill.scaling.cpus_per_worker:g} CPU each, cluster {cpus:g} CPUs")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        for label, width in (("concurrent", 0), ("sequential", 1)):
            wall, util = timed(cfg, Path(tmp) / label, width)
            rows.append((label, wall, util))
            print(f"  {label:<11} {wall:7.1f} s   CPU utilisation {util:5.1%}", flush=True)
    (_, par, _), (_, seq, _) = rows
    print("\n| mode | wall s | CPU util |\n|---|---|---|")
    for label, wall, util in rows:
        print(f"| {label} | {wall:.1f} | {util:.0%} |")
    print(f"\nspeed-up concurrent vs sequential: {seq / par:.2f}x (sequential / concurrent wall time)")


if __name__ == "__main__":
    main()
