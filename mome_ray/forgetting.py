"""The forgetting study: one token budget trained four ways (the regimes of `regimes.py`), on Ray Train.

    mome forgetting --config configs/small.yaml

    sequential   one GPT-2, one language after another (the order of `langs`: en -> fr -> de -> py)
    balanced     the same GPT-2, one session of balanced batches
    jeet         a JEET MoE trained in the same order: stage k trains stack k and the shared embeddings,
                 final LayerNorm and head, so earlier languages can be forgotten through the shared parts;
                 `forgetting.jeet_layers` blocks per stack, so its total parameters are comparable to the
                 single model's (the tables give both counts). Evaluated through the router artifact when the
                 run has one, else an oracle (each block to its true language); the tables say which.
    separate     one whole GPT-2 per language (len(langs) x the parameters), stage k trains expert k only,
                 each language answered by its own expert: forgetting is impossible by construction, a
                 reference and not a finding (`by_construction` in the tables)

`forgetting.train.max_steps` is the budget of every regime (steps of `batch_size` blocks), split into one stage
per language; one LR schedule (warmup, linear decay) over all stages; plain next-token CE from scratch (no
teacher): the study is about the order of the data. One Ray Train run per regime. After every stage each
regime's per-language perplexity is measured on the first `train.eval_blocks` validation blocks (for the
curves and the best stage); forgetting per language = final − best of those (0 = nothing forgotten). The
final model of each regime is then scored on the test split of every language as `eval:` says (`test_ppl` with
its 95 % bootstrap interval by document, a Ray task): the numbers a claim about the final models uses.

    RUN_DIR/forgetting/<regime>/  the regime's final model + meta.json (its parents: tokenizer; jeet also router)
    RUN_DIR/forgetting/   stages.csv (regime, stage, after, lang, ppl),
                          forgetting.csv (regime, lang, best, final, forgetting, forgetting_pct, test_ppl,
                          test_ppl_lo, test_ppl_hi, test_blocks, routing, params_total, params_active,
                          by_construction) + forgetting.md, test_docs.npz (per-document test losses per regime),
                          heatmap.png (ppl per stage x language), lines.png (ppl per language over stages)
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mome_ray import regimes
from mome_ray.cluster import ScalingArgs, on_cluster
from mome_ray.config import from_dict, to_dict
from mome_ray.data import BalancedBatches, eval_blocks, load_blocks
from mome_ray.errors import MomeError
from mome_ray.evaluation import EvalConfig, doc_losses, eval_sets, interval_columns, save_doc_losses
from mome_ray.models import ModelConfig
from mome_ray.moe import Router
from mome_ray.regimes import REGIMES
from mome_ray.storage import RunStore
from mome_ray.training import Progress, TrainConfig, eval_metrics, lm_train_step


@dataclass
class ForgettingConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(n_layer=2, n_embd=128, n_head=4))
    # Blocks per JEET stack (same width as `model`). One stack per language over shared embeddings and
    # head: n_layer ≈ jeet_layers x len(langs) gives about the single model's total parameters.
    jeet_layers: int = 1
    train: TrainConfig = field(default_factory=TrainConfig)  # max_steps: every regime's budget, all stages
    scaling: ScalingArgs = field(default_factory=lambda: ScalingArgs(num_workers=1, cpus_per_worker=1))
    max_parallel: int = 0  # training runs at once (0 = as many as the cluster fits)

    def __post_init__(self):
        if self.jeet_layers < 1:
            raise MomeError(f"forgetting.jeet_layers must be at least 1, got {self.jeet_layers}")


def stage_steps(cfg: ForgettingConfig, n_langs: int) -> int:
    steps = cfg.train.max_steps // n_langs
    if steps < 1:
        raise MomeError(f"forgetting.train.max_steps ({cfg.train.max_steps}) is below one step per language "
                        f"({n_langs} languages); raise it")
    return steps


def builder(cfg: ForgettingConfig, regime: str, langs: list[str], tok_dir: Path):
    """A function making a fresh model of the regime with the run's tokenizer."""
    from mome_ray.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    return lambda: regimes.build(regime, cfg.model, cfg.jeet_layers, langs, len(tok), tok.eos_token_id,
                                 tok.pad_token_id)


def routes(run_dir: Path, regime: str, langs: list[str], tok_dir: Path) -> tuple[str, Callable[[str], Router] | None]:
    """(routing, language -> Router) of a regime's evaluation: JEET through the router artifact when `run_dir`
    has one, else an oracle (`grid.route_for`); the other regimes need no router."""
    if regime != "jeet":
        return regimes.routing_of(regime, "oracle"), None
    from mome_ray.grid import route_for

    return route_for(run_dir, langs, tok_dir)


def train_fn_per_worker(config: dict) -> None:
    """Train one regime's model through its stages (`steps` steps each); evaluate after each."""
    from mome_ray.worker import report, start_run, worker_context

    cfg = from_dict(ForgettingConfig, config["forgetting"])
    regime, langs, steps, seed = config["regime"], config["langs"], config["steps"], config["seed"]
    stages = regimes.stage_langs(regime, langs)
    store = RunStore(config["run"])
    tok_dir = store.fetch("tokenizer")
    train = dataclasses.replace(cfg.train, max_steps=steps * len(stages))  # one LR schedule over all stages
    rank, world, device = worker_context(cfg.scaling.cpus_per_worker)
    T = cfg.model.n_positions

    # --- data: each stage's batches; a fixed validation subset per language
    batches = [BalancedBatches([load_blocks(tok_dir, "train", l, T) for l in stage], train.batch_size, seed, rank,
                               world) for stage in stages]
    val = {l: eval_blocks(load_blocks(tok_dir, "val", l, T), train.eval_blocks, rank, world) for l in langs}
    with store.view(["router"]) as run_dir:  # the router artifact, if the run has one
        _, route = routes(run_dir, regime, langs, tok_dir)

    # --- the model (an MoE: DDP tolerates the experts a stage does not run), optimizer, resume
    build = builder(cfg, regime, langs, tok_dir)
    run = start_run(build, train, config["name"], seed, rank, **regimes.checkpoint_io(regime, build))

    def val_metrics(step: int) -> dict:
        return eval_metrics(step, regimes.language_losses(run.module, regime, val, route, device, train.batch_size,
                                                          train.bf16))

    if not run.resumed:
        run.history = [val_metrics(0) | {"stage": 0}]
    run.model.train()

    # --- train: stage k on its languages' batches (an MoE: through the stage language's expert only)
    progress = Progress(config["name"], train.max_steps, train.batch_size * T * world, train.log_every, rank == 0)
    for step in range(run.step, train.max_steps):
        stage = step // steps
        ids, _ = batches[stage].batch(step)
        progress.tick()
        loss = lm_train_step(regimes.trained(run.model, regime, stages[stage]), run.opt, run.sched, ids.to(device),
                             train, device)
        progress.tock(step, {"loss": loss})
        if (step + 1) % steps == 0:
            metrics = val_metrics(step + 1)
            metrics.update(stage=stage + 1, train_loss=loss)
            run.history.append(metrics)
            report(run, step + 1, metrics)


# ----------------------------------------------------------------------------------------------------------
# Driver side: one Ray Train run per regime, the test-split evaluation (a Ray task), the tables and plots.


def regime_config(cfg: ForgettingConfig, regime: str, langs: list[str], seed: int, routing: str) -> dict:
    """What a regime's trained model depends on: a change re-trains it."""
    d = to_dict(cfg)
    d.pop("max_parallel")
    if regime != "jeet":
        d.pop("jeet_layers")
    return {"langs": langs, "seed": seed, "forgetting": d, "regime": regime,
            "routing": regimes.routing_of(regime, routing)}


def final_eval(cfg: ForgettingConfig, langs: list[str], store: RunStore, eval_cfg: EvalConfig, log=print) -> dict:
    """Each regime's final model on the test split of every language (a Ray task): {regime: {"docs": {lang:
    DocLosses}, "blocks": {lang: n}, "routing", "params_total", "params_active"}}."""
    from mome_ray.training import process_device

    T, device, out = cfg.model.n_positions, process_device(), {}
    with store.view(["tokenizer", "router"] + [f"forgetting/{r}" for r in REGIMES]) as run_dir:
        tok_dir = run_dir / "tokenizer"
        sets = eval_sets(tok_dir, langs, T, eval_cfg)
        log(f"[forgetting] {eval_cfg.split} split: {', '.join(f'{l} {len(s.blocks)}' for l, s in sets.items())} "
            f"blocks of {T} tokens")
        for regime in REGIMES:
            model = regimes.load(regime, run_dir / "forgetting" / regime, builder(cfg, regime, langs, tok_dir))
            model = model.to(device)
            routing, route = routes(run_dir, regime, langs, tok_dir)
            total, active = regimes.param_counts(model, regime)
            docs = {l: doc_losses(regimes.answerer(model, regime, l, route), s, device, cfg.train.batch_size)
                    for l, s in sets.items()}
            out[regime] = {"docs": docs, "blocks": {l: len(s.blocks) for l, s in sets.items()}, "routing": routing,
                           "params_total": total, "params_active": active}
    return out


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


def forgetting_table(stages, final: dict[str, dict], eval_cfg: EvalConfig):
    """Per regime and language: best (over trained stages) and final validation ppl, forgetting = final − best
    (and in % of best), the final model's test ppl [95 % interval], how it was routed, its parameters,
    `by_construction`."""
    trained = stages[stages.stage > 0]
    g = trained.groupby(["regime", "lang"], sort=False)["ppl"]
    table = g.min().rename("best").to_frame().join(g.last().rename("final")).reset_index()
    table["forgetting"] = (table["final"] - table["best"]).round(3)
    table["forgetting_pct"] = (100 * table["forgetting"] / table["best"]).round(2)
    rows = [(final[r], l) for r, l in zip(table.regime, table.lang)]
    scored = {r: interval_columns(t["docs"], eval_cfg) for r, t in final.items()}
    for col in ("ppl", "ppl_lo", "ppl_hi"):
        table[f"test_{col}"] = [scored[r][f"{col}/{l}"] for r, l in zip(table.regime, table.lang)]
    table["test_blocks"] = [t["blocks"][l] for t, l in rows]
    for key in ("routing", "params_total", "params_active"):
        table[key] = [t[key] for t, _ in rows]
    table["by_construction"] = table.regime.isin(regimes.BY_CONSTRUCTION)
    return table


def regime_table(final: dict[str, dict]):
    """One row per regime: what it is, how it is evaluated, its parameters (also relative to one model)."""
    import pandas as pd

    single = final["sequential"]["params_total"]
    return pd.DataFrame([{"regime": regimes.NAMES[r], "what": regimes.WHAT[r], "routing": t["routing"],
                          "params_total": t["params_total"], "params_active": t["params_active"],
                          "total_vs_single": round(t["params_total"] / single, 2)} for r, t in final.items()])


def plot_study(stages, langs: list[str], out_dir: Path) -> list[Path]:
    from mome_ray.plots import heatmaps, panels

    maps, plots = [], []
    for regime in REGIMES:
        r = stages[stages.regime == regime]
        title = textwrap.fill(regimes.NAMES[regime], 30)
        rows = [f"{s}: {a}" for s, a in dict(zip(r.stage, r.after)).items()]
        matrix = [[float(r[(r.stage == s) & (r.lang == l)].ppl.iloc[0]) for l in langs] for s in range(len(rows))]
        maps.append((title, matrix, rows))
        plots.append((title, {l: (list(range(len(rows))), [m[i] for m in matrix]) for i, l in enumerate(langs)}))
    return [heatmaps(maps, langs, out_dir / "heatmap.png", "validation perplexity"),
            panels(plots, out_dir / "lines.png", "stage (0 = untrained, k = after the k-th language)",
                   "validation perplexity", logy=True)]


def _named(df):
    return df.assign(regime=df.regime.map(regimes.NAMES))


def study_markdown(stages, table, final: dict[str, dict], langs: list[str]) -> str:
    from mome_ray.sweeps import markdown_table

    wide = _named(stages).pivot_table(index=["regime", "stage", "after"], columns="lang", values="ppl", sort=False)
    return ("Regimes (params_active: what one sequence runs through; routing: how an MoE picks the expert in "
            "evaluation, `oracle` = the block's true language):\n\n" + markdown_table(regime_table(final))
            + "\nValidation perplexity after every stage:\n\n" + markdown_table(wide[langs].reset_index())
            + "\nForgetting = final − best validation perplexity per language; test ppl = the final model on the "
              "test split [95 % bootstrap interval by document]:\n\n"
            + markdown_table(_named(table).assign(test_ppl=[f"{p:,.1f} [{lo:,.1f}, {hi:,.1f}]" for p, lo, hi in
                                                            zip(table.test_ppl, table.test_ppl_lo, table.test_ppl_hi)])
                             [["regime", "lang", "best", "final", "forgetting", "forgetting_pct", "test_ppl",
                               "by_construction"]]))


def forgetting_study(cfg: ForgettingConfig, langs: list[str], store: RunStore, ray_cfg, parents: dict, seed: int,
                     out_dir: Path, eval_cfg: EvalConfig, log=print) -> dict:
    """Train every regime on the cluster (each model an artifact RUN_DIR/forgetting/<regime>/, skipped when up
    to date), evaluate the final models on the test split, write the tables and plots into `out_dir`; returns
    metrics. `parents` holds the tokenizer's stamp and, when the run has a router, the router's: JEET is then
    evaluated through it and depends on it."""
    from mome_ray.model_runs import ModelRun, train_models

    steps = stage_steps(cfg, len(langs))
    routing = "router" if "router" in parents else "oracle"
    runs = [ModelRun(f"forgetting/{regime}", train_fn_per_worker,
                     {"forgetting": to_dict(cfg), "regime": regime, "langs": list(langs), "steps": steps,
                      "seed": seed, "name": f"forgetting-{regime}", "run": store.location},
                     cfg.scaling, regime_config(cfg, regime, langs, seed, routing), cfg.train.keep_checkpoints,
                     parents=parents if regime == "jeet" else {k: v for k, v in parents.items() if k != "router"})
            for regime in REGIMES]
    metas = train_models(store, runs, parents, ray_cfg, seed, max_parallel=cfg.max_parallel, log=log)
    final = on_cluster(final_eval, cfg, langs, store, eval_cfg, cpus=ray_cfg.task_cpus, gpus=ray_cfg.task_gpus,
                       name="forgetting-test", log=log)
    stages = stage_table({r: metas[f"forgetting/{r}"]["metrics"]["history"] for r in REGIMES}, langs)
    table = forgetting_table(stages, final, eval_cfg)
    save_doc_losses(out_dir / "test_docs.npz", {r: t["docs"] for r, t in final.items()})
    stages.to_csv(out_dir / "stages.csv", index=False)
    table.to_csv(out_dir / "forgetting.csv", index=False)
    (out_dir / "forgetting.md").write_text(study_markdown(stages, table, final, langs))
    plot_study(stages, langs, out_dir)
    return {"steps_per_stage": steps, "tokens_per_regime": steps * len(langs) * cfg.train.batch_size
            * cfg.model.n_positions,
            "regimes": {r: {"name": regimes.NAMES[r], "by_construction": r in regimes.BY_CONSTRUCTION,
                            **{k: t[k] for k in ("routing", "params_total", "params_active")}}
                        for r, t in final.items()},
            "forgetting": table.to_dict(orient="records"), "stages": stages.to_dict(orient="records")}
