"""Time and memory of the tiny pipeline on many synthetic languages (50 by default), stage by stage.

    python benchmarks/many_langs.py [--langs 50] [--run-dir runs/many_langs] [--experts 2] [--batch-size 8]

Writes `--langs` pseudo-languages (`mome_ray.corpus.synthetic`: each pure configuration, a user_dir folder
plus its stop words) and runs the `tiny` preset on them with a batch size that need not be a multiple of the
number of languages: corpus, tokenizer, teacher (Ray Train, 2 workers), `--experts` distilled experts, the
router, JEET + MoE-CE (Ray Train, concurrently), then JEET evaluated on every language through the router.
Starts its own local Ray cluster (or joins RAY_ADDRESS). Per stage: wall seconds, peak RSS of this driver
(getrusage), and the peak summed RSS of the driver and every process it started (Ray's GCS, raylet and
workers; sampled from /proc every 0.2 s; shared pages count once per process, so it is an upper bound).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mome_ray import stages  # noqa: E402
from mome_ray.cluster import init_ray  # noqa: E402
from mome_ray.artifacts import read_meta  # noqa: E402
from mome_ray.corpus.synthetic import lang_codes, write_languages  # noqa: E402
from mome_ray.settings import load_settings  # noqa: E402


def tree_rss_mb(root: int) -> float:
    """Summed resident memory (MB) of process `root` and all its descendants, from /proc."""
    parent, rss = {}, {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            parent[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            rss[int(proc.name)] = int((proc / "statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    tree, grew = {root}, True
    while grew:
        more = {p for p, pp in parent.items() if pp in tree} - tree
        tree |= more
        grew = bool(more)
    return sum(rss.get(p, 0) for p in tree) / 2**20


class PeakSampler:
    """Samples `tree_rss_mb(this process)` in a thread; `take()` returns the peak since the last take."""

    def __init__(self, every: float = 0.2):
        self.peak, self.every, self._stop = 0.0, every, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, tree_rss_mb(os.getpid()))

    def take(self) -> float:
        peak, self.peak = max(self.peak, tree_rss_mb(os.getpid())), 0.0
        return peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def driver_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def jeet_through_router(cfg) -> dict:
    """JEET's 'router top-1' row of the evaluation grid on every language, and the router's accuracy there."""
    import torch

    from mome_ray.evaluation import eval_sets
    from mome_ray.grid import evaluate_grid, moe_rows, route_for
    from mome_ray.jeet import JEETModel
    from mome_ray.moe import MoE

    run_dir, tok_dir = Path(cfg.run_dir), Path(cfg.run_dir) / "tokenizer"
    routing, route = route_for(run_dir, cfg.langs, tok_dir)
    moe = MoE(JEETModel.load(run_dir / "moe" / "jeet"))
    row = [r for r in moe_rows("JEET", moe, route, routing, cfg.moe.top_k) if r.row == f"{routing} top-1"]
    sets = eval_sets(tok_dir, cfg.langs, cfg.moe.model.n_positions, cfg.eval)
    grid, _ = evaluate_grid(row, sets, cfg.eval)
    hits = sum(int((route(l)(torch.from_numpy(s.blocks.astype("int64")), None).index == i).sum())
               for i, (l, s) in enumerate(sets.items()))
    return {"routing": routing, "mean_ppl": float(grid["mean_ppl"][0]),
            "routing_accuracy": hits / sum(len(s.blocks) for s in sets.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--langs", type=int, default=50)
    ap.add_argument("--run-dir", default=str(ROOT / "runs/many_langs"))
    ap.add_argument("--experts", type=int, default=2, help="languages to distil an expert for")
    ap.add_argument("--batch-size", type=int, default=8, help="teacher, experts and MoE batch size")
    args = ap.parse_args()

    run_dir = Path(args.run_dir).resolve()
    shutil.rmtree(run_dir, ignore_errors=True)
    sampler = PeakSampler()
    rows = []

    def stage(name: str, fn) -> None:
        sampler.take()
        t0 = time.perf_counter()
        fn()
        rows.append((name, time.perf_counter() - t0, driver_peak_mb(), sampler.take()))
        print(f"-- {name}: {rows[-1][1]:.1f} s", flush=True)

    overrides = []
    stage("write languages", lambda: overrides.extend(write_languages(run_dir / "text", args.langs)))
    b = args.batch_size
    cfg = load_settings(str(ROOT / "configs/tiny.yaml"), [
        f"run_dir={run_dir}", *overrides, f"teacher.train.batch_size={b}", f"distill.train.batch_size={b}",
        f"moe.train.batch_size={b}", f"distill.langs=[{','.join(lang_codes(args.langs)[:args.experts])}]",
        "distill.baselines=false"])
    quiet = lambda *a: None  # noqa: E731
    stage("corpus", lambda: stages.corpus(cfg, log=quiet))
    stage("tokenizer", lambda: stages.tokenizer(cfg, log=quiet))
    stage("ray.init", lambda: init_ray(cfg.ray))
    stage("teacher (Ray Train, 2 workers)", lambda: stages.teacher(cfg, log=quiet))
    stage(f"experts ({args.experts}, KD)", lambda: stages.experts(cfg, log=quiet))
    stage("router", lambda: stages.router(cfg, log=quiet))

    from mome_ray.moe_train import train_moes
    from mome_ray.storage import RunStore

    stage("JEET + MoE-CE (Ray Train)", lambda: train_moes(
        cfg.moe, cfg.langs, RunStore(run_dir), cfg.ray, stages.parents_of(RunStore(run_dir), "experts"), cfg.seed, log=quiet))
    result = {}
    stage("JEET eval through the router", lambda: result.update(jeet_through_router(cfg)))
    sampler.stop()

    teacher = read_meta(run_dir, "teacher")["metrics"]
    print(f"\n{args.langs} languages, batch size {b}, tiny preset, {os.cpu_count()} CPUs")
    print(f"{'stage':<34}{'wall s':>8}{'driver peak MB':>16}{'tree peak MB':>14}")
    for name, seconds, driver, tree in rows:
        print(f"{name:<34}{seconds:>8.1f}{driver:>16.0f}{tree:>14.0f}")
    print(f"{'total':<34}{sum(r[1] for r in rows):>8.1f}")
    print(f"\nteacher mean val ppl: {teacher['untrained']['val_ppl']:.1f} untrained -> {teacher['final']['val_ppl']:.1f}")
    print(f"JEET mean val ppl through the {result['routing']}: {result['mean_ppl']:.1f}; "
          f"router top-1 accuracy on the validation blocks: {result['routing_accuracy']:.3f}")


if __name__ == "__main__":
    main()
