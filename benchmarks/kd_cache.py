"""Cached vs online teacher in KD: step time and the final test perplexity of one expert, side by side.

    python benchmarks/kd_cache.py [--run-dir runs/small] [--lang en] [--time bucket,bucket+s,uniform+s]
                                  [--train online,bucket+s] [teacher_logits.max_blocks=1600 ...]
    python benchmarks/kd_cache.py --top-k 0 --time full --train online,full teacher_logits.max_blocks=1600

Needs a run dir with the tokenizer and teacher stages of the `small` preset. In one process, no Ray, one thread
(a student worker's `cpus_per_worker: 1`):
1. caches the teacher's logits of `--lang` (the `teacher_logits` stage's own task, `logit_cache.cache_language`);
2. times warm KD steps (CPU time of this process: other load on the machine does not count) of the same student
   on the same batches: online (the teacher runs), cached (each tail treatment) and CE only (no teacher);
3. trains the expert of `--lang` from the same seed for `distill.train.max_steps` steps on the same batches,
   with each teacher of `--train`, and scores it on the whole test split.
Targets: cached step close to a CE step; perplexity cached / online within 1 %. Results: BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mome_ray.alpha import AlphaConfig, AlphaSchedule  # noqa: E402
from mome_ray.artifacts import read_meta  # noqa: E402
from mome_ray.data import BalancedBatches, load_blocks  # noqa: E402
from mome_ray.kd import OnlineTeacher, frozen_teacher, kd_step  # noqa: E402
from mome_ray.logit_cache import CachedTeacher, cache_language  # noqa: E402
from mome_ray.models import build_gpt2, load_lm  # noqa: E402
from mome_ray.settings import load_settings  # noqa: E402
from mome_ray.stages import stage_config  # noqa: E402
from mome_ray.storage import RunStore  # noqa: E402
from mome_ray.tokenizer import load_tokenizer  # noqa: E402
from mome_ray.training import build_optimizer, build_schedule, evaluate, perplexity  # noqa: E402

CPU = torch.device("cpu")


def student(cfg, tok, seed: int):
    torch.manual_seed(seed)  # as `worker.start_run`
    model = build_gpt2(cfg.model, len(tok), tok.eos_token_id, tok.pad_token_id).train()
    opt = build_optimizer(model, cfg.train)
    return model, opt, build_schedule(opt, cfg.train)


def step_times(cfg, tok, batches, teachers: dict, rounds: int, steps: int) -> dict[str, float]:
    """Median seconds per warm step of each teacher (None = CE only), interleaved: `rounds` x `steps` each."""
    runs = {name: student(cfg, tok, 0) for name in teachers}
    times = {name: [] for name in teachers}
    for r in range(rounds + 1):  # round 0 warms up
        for name, teacher in teachers.items():
            model, opt, sched = runs[name]
            for i in range(steps):
                step = r * steps + i
                ids, _ = batches.batch(step)
                t0 = time.process_time()  # CPU time: other processes on the machine do not count
                kd_step(model, teacher, opt, sched, ids, batches.index(step), 0.5 if teacher else 1.0,
                        0.5 if teacher else 0.0, cfg.kd_loss, cfg.temperature, cfg.train, CPU)
                if r:
                    times[name].append(time.process_time() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def train_expert(cfg, tok, batches, teacher, test, seed: int) -> float:
    """The expert's KD loop (`kd.kd_train` without Ray): test perplexity after `cfg.train.max_steps` steps."""
    model, opt, sched = student(cfg, tok, seed)
    schedule = AlphaSchedule(cfg.alpha if teacher else AlphaConfig("fixed", 1.0), cfg.train.max_steps)
    for step in range(cfg.train.max_steps):
        ids, _ = batches.batch(step)
        alpha, beta = schedule.weights(step)
        ce, kd = kd_step(model, teacher, opt, sched, ids, batches.index(step), alpha, beta, cfg.kd_loss,
                         cfg.temperature, cfg.train, CPU)
        if kd is not None:
            schedule.update(ce, kd)
    loss = evaluate(model, test, CPU, cfg.train.batch_size, False)
    return perplexity(next(iter(loss.values())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/small.yaml"))
    ap.add_argument("--run-dir", default=str(ROOT / "runs/small"))
    ap.add_argument("--lang", default="en")
    ap.add_argument("--time", default="bucket,bucket+s,uniform+s",
                    help="cache treatments to time: a tail (bucket, uniform), '+s' = with the sampled tail tokens")
    ap.add_argument("--train", default="online,bucket+s", help="teachers to train the expert with (online, CE, or "
                    "a treatment as in --time)")
    ap.add_argument("--kd-loss", default="", help="default: the config's distill.kd_loss")
    ap.add_argument("--top-k", type=int, default=-1, help="default: the config's teacher_logits.top_k")
    ap.add_argument("--rounds", type=int, default=4, help="timing rounds (each: --steps steps of every teacher)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-train", action="store_true", help="step times only")
    args, overrides = ap.parse_known_args()
    torch.set_num_threads(1)

    extra = [f"run_dir={Path(args.run_dir).absolute()}"] + ([f"distill.kd_loss={args.kd_loss}"] if args.kd_loss else [])
    extra += [f"teacher_logits.top_k={args.top_k}"] if args.top_k >= 0 else []
    settings = load_settings(args.config, extra + overrides)
    cfg, store, lang = settings.distill, RunStore(settings.run_dir), args.lang
    tok_dir = store.fetch("tokenizer")
    tok, T = load_tokenizer(tok_dir), cfg.model.n_positions
    teacher_meta = read_meta(store, "teacher")
    final = teacher_meta["metrics"].get("final", {})
    print(f"teacher: {teacher_meta['config']['teacher']['model']}, {final.get('step', '?')} steps, val ppl "
          f"{final.get('val_ppl', float('nan')):.1f}; student {cfg.model}; KD {cfg.kd_loss}, {cfg.alpha.strategy} "
          f"alpha, temperature {cfg.temperature}; lang {lang}")

    # --- 1. the cache, as the stage makes it
    parents = {p: read_meta(store, p)["created"] for p in ("tokenizer", "teacher")}
    t0 = time.perf_counter()
    cache_language(settings.teacher_logits, lang, store, T, stage_config(settings, "teacher_logits"), parents,
                   settings.seed, log=lambda line: print(line, flush=True))
    cache_s = time.perf_counter() - t0
    cached = CachedTeacher.load(store, [lang], T)
    online = OnlineTeacher(frozen_teacher(load_lm(store.fetch("teacher"), tok_dir), CPU, False))
    # Both read the blocks the cache covers (all of them unless teacher_logits.max_blocks): the same batches.
    batches = BalancedBatches([load_blocks(tok_dir, "train", lang, T, cached.train_limit(lang))],
                              cfg.train.batch_size, settings.seed)
    k = settings.teacher_logits.top_k or "full"
    print(f"cache: {cached.train_limit(lang)} blocks of {lang}, top {k} + tail, in {cache_s:.0f} s "
          f"(0 s if it was up to date)\n")

    timed = [t for t in args.time.split(",") if t]
    trained = [] if args.no_train else [t for t in args.train.split(",") if t]
    teachers = {"online": online, "CE": None}
    teachers |= {t: _treated(cached, t) for t in timed + trained if t not in teachers}

    # --- 2. step time
    times = step_times(cfg, tok, batches, {t: teachers[t] for t in ["online", *timed, "CE"]}, args.rounds,
                       args.steps) if args.rounds else {}
    if times:
        print(f"KD step time (CPU seconds, median of {args.rounds * args.steps} warm steps, batch "
              f"{cfg.train.batch_size} x {T}, 1 thread; 'cached X': tail treatment X, '+s' with sampled tail tokens):")
        print(f"{'teacher':<20}{'s/step':>9}{'/ online':>10}{'/ CE step':>11}")
        for name, sec in times.items():
            print(f"{_label(name):<20}{sec:>9.3f}{sec / times['online']:>10.2f}{sec / times['CE']:>11.2f}")
    if not trained:
        return

    # --- 3. quality: the expert trained with each teacher, same seed, steps and batches
    test = {lang: load_blocks(tok_dir, "test", lang, T)}
    print(f"\nexpert '{lang}': {cfg.train.max_steps} steps, seed {settings.seed}, test perplexity on all "
          f"{len(test[lang])} test blocks:")
    ppl = {}
    for name in trained:
        t0 = time.perf_counter()
        ppl[name] = train_expert(cfg, tok, batches, teachers[name], test, settings.seed)
        ratio = f"  ratio to online {ppl[name] / ppl['online']:.4f}" if "online" in ppl else ""
        print(f"{_label(name):<20}{ppl[name]:>10.2f}{ratio}  ({time.perf_counter() - t0:.0f} s)", flush=True)


def _label(name: str) -> str:
    return name if name in ("online", "CE") else f"cached {name}"  # 'cached full': the whole vocabulary (--top-k 0)


def _treated(cached: CachedTeacher, treatment: str) -> CachedTeacher:
    """The same cache read with tail treatment `bucket` / `uniform`, with the sampled tail tokens if '+s'
    (`full`: a full-vocabulary cache, which has no tail)."""
    if treatment == "full" and cached.caches[0].get("ids") is not None:
        raise SystemExit("'full' needs a full-vocabulary cache: --top-k 0")
    tail, samples = ("bucket" if treatment == "full" else treatment.removesuffix("+s")), treatment.endswith("+s")
    caches = [{k: v for k, v in c.items() if samples or not k.startswith("tail_")} for c in cached.caches]
    return CachedTeacher(list(cached.limits), caches, cached.vocab, tail)


if __name__ == "__main__":
    main()
