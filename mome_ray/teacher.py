"""The teacher: a GPT-2 trained from scratch on balanced language batches with Ray Train (DDP).

    mome teacher --config configs/small.yaml
    ray job submit --working-dir . -- python -m jobs.train_teacher --config configs/small.yaml

`train_fn_per_worker` is the loop each Ray Train worker runs: setup -> (resume) -> train -> eval/report.
Rank 0 checkpoints at every eval; a dead worker restarts the group from the last checkpoint
(`FailureConfig`), and a killed run resumes when the same command runs again (same run name + storage).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mome_ray.cluster import RayConfig, ScalingArgs
from mome_ray.config import from_dict, to_dict
from mome_ray.data import BalancedBatches, eval_blocks, load_blocks
from mome_ray.launch import export_checkpoint, fit, run_name
from mome_ray.models import ModelConfig, build_gpt2, n_params
from mome_ray.storage import RunStore
from mome_ray.tokenizer import load_tokenizer
from mome_ray.training import Progress, TrainConfig, eval_metrics, evaluate, lm_train_step
from mome_ray.worker import report, start_run, worker_context


@dataclass
class TeacherConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingArgs = field(default_factory=ScalingArgs)


def train_fn_per_worker(config: dict) -> None:
    cfg = from_dict(TeacherConfig, config["teacher"])
    langs, seed, name = config["langs"], config["seed"], config["name"]
    tok_dir = RunStore(config["run"]).fetch("tokenizer")  # this node's copy
    rank, world, device = worker_context(cfg.scaling.cpus_per_worker)
    T = cfg.model.n_positions

    # --- data: balanced batches over every language, a fixed eval subset per language
    batches = BalancedBatches([load_blocks(tok_dir, "train", l, T) for l in langs], cfg.train.batch_size, seed,
                              rank, world)
    val = {l: eval_blocks(load_blocks(tok_dir, "val", l, T), cfg.train.eval_blocks, rank, world) for l in langs}

    def build():
        tok = load_tokenizer(tok_dir)
        return build_gpt2(cfg.model, len(tok), tok.eos_token_id, tok.pad_token_id)

    # --- model, optimizer; resume from the latest checkpoint if Ray Train hands us one
    run = start_run(build, cfg.train, name, seed, rank)
    if not run.resumed:
        # Step 0: the untrained model's validation loss, the baseline every later number is read against.
        run.history = [eval_metrics(0, evaluate(run.model, val, device, cfg.train.batch_size, cfg.train.bf16))]
        if rank == 0:
            print(f"[{name}] {n_params(run.model) / 1e6:.2f}M params, {world} workers, {cfg.train.max_steps} "
                  f"steps, {batches.steps_per_epoch} steps/epoch", flush=True)

    # --- train
    run.model.train()
    progress = Progress(name, cfg.train.max_steps, cfg.train.batch_size * T * world, cfg.train.log_every, rank == 0)
    for step in range(run.step, cfg.train.max_steps):
        ids, _ = batches.batch(step)
        progress.tick()
        loss = lm_train_step(run.model, run.opt, run.sched, ids.to(device), cfg.train, device)
        progress.tock(step, {"loss": loss})

        if (step + 1) % cfg.train.eval_every == 0 or step + 1 == cfg.train.max_steps:
            metrics = eval_metrics(step + 1, evaluate(run.model, val, device, cfg.train.batch_size, cfg.train.bf16))
            metrics.update(train_loss=loss, lr=run.sched.get_last_lr()[0], tokens_per_s=progress.tokens_per_s)
            run.history.append(metrics)
            report(run, step + 1, metrics)


def train_teacher(cfg: TeacherConfig, langs: list[str], store: RunStore, ray_cfg: RayConfig, parents: dict,
                  seed: int, out_dir: Path, fresh: bool = False) -> dict:
    """Train the teacher on the cluster and write its model + tokenizer into `out_dir`; returns metrics."""
    loop_config = {"teacher": to_dict(cfg), "langs": langs, "run": store.location, "seed": seed, "name": "teacher"}
    name = run_name(store, "teacher", loop_config, parents)
    result, resumed = fit(train_fn_per_worker, loop_config, cfg.scaling, ray_cfg, store, name,
                          cfg.train.keep_checkpoints, fresh)
    history = export_checkpoint(result, out_dir)["history"]
    load_tokenizer(store.fetch("tokenizer")).save_pretrained(str(out_dir))
    return {"final": history[-1], "untrained": history[0], "history": history, "resumed": resumed}
