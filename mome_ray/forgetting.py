"""The forgetting study: the same model size and token budget trained three ways, on Ray Train.

    mome forgetting --config configs/small.yaml

    sequential   one model, one language after another (the order of `langs`: en -> fr -> de -> py)
    balanced     one model, one session of balanced batches (every batch an equal share of each language)
    moe          one expert per language (each the same size as the single model) in one PLE MoE, trained
                 in the same order: stage k trains the k-th language's expert only (forced routing); every
                 language is answered by its own expert (untrained until its stage)

`forgetting.train.max_steps` is the budget of every regime (steps of `batch_size` blocks), split into
one stage per language. After every stage each regime's per-language validation perplexity is measured:
for `balanced` a stage is the same share of steps over all languages; for `moe`, after stage k the
experts of the first k languages are trained and the others are still untrained. One Ray Train run per
regime.
Training is plain next-token CE from scratch (no teacher), one LR schedule (warmup, linear decay) over all
stages in every regime: the study is about the order of the data.
Forgetting per language = final perplexity − best perplexity over the stages (0 = nothing forgotten).

    RUN_DIR/forgetting/   stages.csv (regime, stage, lang, ppl), forgetting.csv + forgetting.md,
                          heatmap.png (ppl per stage x language), lines.png (ppl per language over stages)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from mome_ray.cluster import ScalingArgs
from mome_ray.config import from_dict, to_dict
from mome_ray.data import BalancedBatches, eval_blocks, load_blocks
from mome_ray.errors import MomeError
from mome_ray.jeet import DDP_KWARGS
from mome_ray.models import ModelConfig, build_gpt2
from mome_ray.moe import MoE, PLEExperts
from mome_ray.evaluation import per_language_eval
from mome_ray.moe import Routed
from mome_ray.storage import RunStore
from mome_ray.tokenizer import load_tokenizer
from mome_ray.training import Progress, TrainConfig, eval_metrics, evaluate, lm_train_step

REGIMES = ("sequential", "balanced", "moe")


def _PLE_CHECKPOINT(build) -> dict:
    """start_run's load/save for the MoE regime's PLE (whole GPT-2s with tied heads: safetensors save_model)."""
    from safetensors.torch import load_model, save_model

    def load(d: Path):
        model = build()
        load_model(model, str(Path(d) / "model.safetensors"))
        return model

    return {"load": load, "save": lambda m, d: save_model(m, str(Path(d) / "model.safetensors")),
            "ddp_kwargs": DDP_KWARGS}


@dataclass
class ForgettingConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(n_layer=2, n_embd=128, n_head=4))
    train: TrainConfig = field(default_factory=TrainConfig)  # max_steps: every regime's budget, all stages
    scaling: ScalingArgs = field(default_factory=lambda: ScalingArgs(num_workers=1, cpus_per_worker=1))
    max_parallel: int = 0  # training runs at once (0 = as many as the cluster fits)


def stage_steps(cfg: ForgettingConfig, n_langs: int) -> int:
    steps = cfg.train.max_steps // n_langs
    if steps < 1:
        raise MomeError(f"forgetting.train.max_steps ({cfg.train.max_steps}) is below one step per language "
                        f"({n_langs} languages); raise it")
    return steps


def train_fn_per_worker(config: dict) -> None:
    """Train one model through `stages` (each a list of languages, `steps` steps); evaluate after each."""
    from mome_ray.worker import report, start_run, worker_context

    cfg = from_dict(ForgettingConfig, config["forgetting"])
    stages, steps, eval_langs = config["stages"], config["steps"], config["eval_langs"]
    tok_dir, seed, name = RunStore(config["run"]).fetch("tokenizer"), config["seed"], config["name"]
    train = dataclasses.replace(cfg.train, max_steps=steps * len(stages))  # one LR schedule over all stages
    rank, world, device = worker_context(cfg.scaling.cpus_per_worker)
    T = cfg.model.n_positions

    batches = [BalancedBatches([load_blocks(tok_dir, "train", l, T) for l in stage], train.batch_size, seed, rank,
                               world) for stage in stages]
    val = {l: eval_blocks(load_blocks(tok_dir, "val", l, T), train.eval_blocks, rank, world) for l in eval_langs}

    def build():
        tok = load_tokenizer(tok_dir)
        one = lambda: build_gpt2(cfg.model, len(tok), tok.eos_token_id, tok.pad_token_id)  # noqa: E731
        return MoE(PLEExperts({l: one() for l in eval_langs})) if moe else one()

    def val_metrics(step: int) -> dict:
        if moe:  # each language through its own expert
            return eval_metrics(step, per_language_eval(run.module, val, device, train))
        return eval_metrics(step, evaluate(run.model, val, device, train.batch_size, train.bf16))

    moe = config["regime"] == "moe"
    run = start_run(build, train, name, seed, rank, **(_PLE_CHECKPOINT(build) if moe else {}))
    if not run.resumed:
        run.history = [val_metrics(0) | {"stage": 0}]
    run.model.train()
    progress = Progress(name, train.max_steps, train.batch_size * T * world, train.log_every, rank == 0)
    for step in range(run.step, train.max_steps):
        stage = step // steps
        ids, _ = batches[stage].batch(step)
        model = Routed(run.model, force=stages[stage][0]) if moe else run.model  # moe: the stage's expert only
        progress.tick()
        loss = lm_train_step(model, run.opt, run.sched, ids.to(device), train, device)
        progress.tock(step, {"loss": loss})
        if (step + 1) % steps == 0:
            metrics = val_metrics(step + 1)
            metrics.update(stage=stage + 1, train_loss=loss)
            run.history.append(metrics)
            report(run, step + 1, metrics)


def jobs_for(cfg: ForgettingConfig, langs: list[str], store: RunStore, seed: int) -> dict[str, dict]:
    """Loop configs, one Ray Train run per regime."""
    steps = stage_steps(cfg, len(langs))
    plans = {"sequential": [[l] for l in langs], "balanced": [list(langs)] * len(langs),
             "moe": [[l] for l in langs]}
    return {regime: {"forgetting": to_dict(cfg), "regime": regime, "stages": stages, "steps": steps, "seed": seed,
                     "name": f"forgetting-{regime}", "eval_langs": list(langs), "run": store.location}
            for regime, stages in plans.items()}


def stage_table(histories: dict[str, list[dict]], langs: list[str]):
    """(regime, stage, after, lang, ppl) after every stage; stage 0 is the untrained model."""
    import pandas as pd

    records = []
    for regime in REGIMES:
        for stage, metrics in enumerate(histories[regime]):
            after = "untrained" if stage == 0 else "all" if regime == "balanced" else langs[stage - 1]
            records += [{"regime": regime, "stage": stage, "after": after, "lang": lang,
                         "ppl": round(metrics[f"val_ppl/{lang}"], 3)} for lang in langs]
    return pd.DataFrame(records)


def forgetting_table(stages):
    """Per regime and language: best (over trained stages), final, forgetting = final − best, in ppl and %."""
    trained = stages[stages.stage > 0]
    g = trained.groupby(["regime", "lang"], sort=False)["ppl"]
    table = g.min().rename("best").to_frame().join(g.last().rename("final")).reset_index()
    table["forgetting"] = (table["final"] - table["best"]).round(3)
    table["forgetting_pct"] = (100 * table["forgetting"] / table["best"]).round(2)
    return table


def plot_study(stages, langs: list[str], out_dir: Path) -> list[Path]:
    from mome_ray.plots import heatmaps, panels

    maps, plots = [], []
    for regime in REGIMES:
        r = stages[stages.regime == regime]
        rows = [f"{s}: {a}" for s, a in dict(zip(r.stage, r.after)).items()]
        matrix = [[float(r[(r.stage == s) & (r.lang == l)].ppl.iloc[0]) for l in langs] for s in range(len(rows))]
        maps.append((regime, matrix, rows))
        plots.append((regime, {l: (list(range(len(rows))), [m[i] for m in matrix]) for i, l in enumerate(langs)}))
    return [heatmaps(maps, langs, out_dir / "heatmap.png", "validation perplexity"),
            panels(plots, out_dir / "lines.png", "stage (0 = untrained, k = after the k-th language)",
                   "validation perplexity", logy=True)]


def forgetting_study(cfg: ForgettingConfig, langs: list[str], store: RunStore, ray_cfg, parents: dict, seed: int,
                     out_dir: Path, log=print) -> dict:
    """Train every regime on the cluster (each model an artifact RUN_DIR/forgetting/<regime>/, skipped when up
    to date), write the tables and plots into `out_dir`; returns metrics."""
    from mome_ray.model_runs import ModelRun, train_models
    from mome_ray.sweeps import markdown_table

    loops = jobs_for(cfg, langs, store, seed)
    depends = {"langs": langs, "seed": seed, "forgetting": to_dict(cfg)}
    runs = [ModelRun(f"forgetting/{regime}", train_fn_per_worker, loop, cfg.scaling, {**depends, "regime": regime},
                     cfg.train.keep_checkpoints) for regime, loop in loops.items()]
    metas = train_models(store, runs, parents, ray_cfg, seed, max_parallel=cfg.max_parallel, log=log)
    histories = {regime: metas[f"forgetting/{regime}"]["metrics"]["history"] for regime in loops}
    stages = stage_table(histories, langs)
    table = forgetting_table(stages)
    stages.to_csv(out_dir / "stages.csv", index=False)
    table.to_csv(out_dir / "forgetting.csv", index=False)
    wide = stages.pivot_table(index=["regime", "stage", "after"], columns="lang", values="ppl", sort=False)
    (out_dir / "forgetting.md").write_text(
        "Validation perplexity after every stage:\n\n" + markdown_table(wide[langs].reset_index())
        + "\nForgetting = final − best perplexity per language:\n\n" + markdown_table(table))
    plot_study(stages, langs, out_dir)
    return {"steps_per_stage": loops["sequential"]["steps"], "tokens_per_regime": cfg.train.max_steps
            // len(langs) * len(langs) * cfg.train.batch_size * cfg.model.n_positions,
            "forgetting": table.to_dict(orient="records"), "stages": stages.to_dict(orient="records")}
