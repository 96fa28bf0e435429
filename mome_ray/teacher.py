"""The teacher: a GPT-2 trained from scratch on balanced language batches with Ray Train (DDP).

    mome teacher --config configs/small.yaml
    ray job submit --working-dir . -- python -m jobs.train_teacher --config configs/small.yaml

`train_fn_per_worker` is the loop each Ray Train worker runs: setup -> (resume) -> train -> eval/report.
Rank 0 checkpoints at every eval; a dead worker restarts the group from the last checkpoint
(`FailureConfig`), and a killed run resumes when the same command runs again (same run name + storage).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mome_ray.cluster import RayConfig, ScalingArgs, quiet_worker, storage_path
from mome_ray.config import from_dict, to_dict
from mome_ray.data import BalancedBatches, eval_blocks, load_blocks
from mome_ray.errors import MomeError
from mome_ray.models import ModelConfig, build_gpt2, n_params
from mome_ray.tokenizer import load_tokenizer
from mome_ray.training import (Progress, TrainConfig, build_optimizer, build_schedule, evaluate, lm_train_step,
                               load_state, perplexity, save_state)


@dataclass
class TeacherConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingArgs = field(default_factory=ScalingArgs)


def eval_metrics(step: int, val: dict[str, float]) -> dict:
    """Flat metrics of one evaluation: val_loss/<lang>, val_ppl/<lang> and their means."""
    m = {"step": step, "val_loss": sum(val.values()) / len(val)}
    m["val_ppl"] = perplexity(m["val_loss"])
    for lang, loss in val.items():
        m[f"val_loss/{lang}"] = loss
        m[f"val_ppl/{lang}"] = perplexity(loss)
    return m


def train_fn_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from transformers import AutoModelForCausalLM

    quiet_worker()
    cfg = from_dict(TeacherConfig, config["teacher"])
    langs, tok_dir, seed, name = config["langs"], Path(config["tokenizer_dir"]), config["seed"], config["name"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    device = ray.train.torch.get_device()
    T = cfg.model.n_positions

    # --- data: balanced batches over every language, a fixed eval subset per language
    batches = BalancedBatches([load_blocks(tok_dir, "train", l, T) for l in langs], cfg.train.batch_size, seed,
                              rank, world)
    val = {l: eval_blocks(load_blocks(tok_dir, "val", l, T), cfg.train.eval_blocks, rank, world) for l in langs}

    # --- model, optimizer; resume from the latest checkpoint if Ray Train hands us one
    torch.manual_seed(seed)
    checkpoint = ray.train.get_checkpoint()
    ckpt_dir = Path(checkpoint.to_directory()) if checkpoint else None
    if ckpt_dir:
        model = AutoModelForCausalLM.from_pretrained(str(ckpt_dir))
    else:
        tok = load_tokenizer(tok_dir)
        model = build_gpt2(cfg.model, len(tok), tok.eos_token_id, tok.pad_token_id)
    model = ray.train.torch.prepare_model(model)
    opt = build_optimizer(model, cfg.train)
    sched = build_schedule(opt, cfg.train)
    if ckpt_dir:
        start, history = load_state(ckpt_dir, opt, sched)
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # to_directory() made a temporary local copy
        if rank == 0:
            print(f"[{name}] resumed from step {start}", flush=True)
    else:
        # Step 0: the untrained model's validation loss, the baseline every later number is read against.
        start, history = 0, [eval_metrics(0, evaluate(model, val, device, cfg.train.batch_size, cfg.train.bf16))]
    if rank == 0 and start == 0:
        print(f"[{name}] {n_params(model) / 1e6:.2f}M params, {world} workers, {cfg.train.max_steps} steps, "
              f"{batches.steps_per_epoch} steps/epoch", flush=True)

    # --- train
    model.train()
    tokens_per_step = cfg.train.batch_size * T * world
    progress = Progress(name, cfg.train.max_steps, tokens_per_step, cfg.train.log_every, rank == 0)
    for step in range(start, cfg.train.max_steps):
        ids, _ = batches.batch(step)
        ids = ids.to(device)
        progress.tick()
        loss = lm_train_step(model, opt, sched, ids, cfg.train, device)
        progress.tock(step, {"loss": loss})

        done = step + 1 == cfg.train.max_steps
        if (step + 1) % cfg.train.eval_every == 0 or done:
            metrics = eval_metrics(step + 1, evaluate(model, val, device, cfg.train.batch_size, cfg.train.bf16))
            metrics.update(train_loss=loss, lr=sched.get_last_lr()[0], tokens_per_s=progress.tokens_per_s)
            history.append(metrics)
            report(model, opt, sched, step + 1, history, metrics, rank)


def report(model, opt, sched, step: int, history: list[dict], metrics: dict, rank: int) -> None:
    """Every rank reports; rank 0 attaches a checkpoint (weights in safetensors + optimizer state)."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        getattr(model, "module", model).save_pretrained(d)
        save_state(Path(d), opt, sched, step, history)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


# ----------------------------------------------------------------------------------------------------------
# Launch (driver side)


def prepare_storage(storage: str, name: str, fingerprint: dict, fresh: bool) -> bool:
    """Keep an interrupted run of the same config to resume; clear anything else. Returns True on resume.

    Ray Train V2 resumes a run whose name and storage already exist. That is what we want after a kill,
    but not after a config change or a completed run, which must start over.
    """
    if "://" in storage:  # remote storage: Ray decides; we cannot cheaply inspect it
        return False
    run = Path(storage) / name
    stamp = run / "mome_fingerprint.json"
    if run.exists() and (fresh or not stamp.is_file() or json.loads(stamp.read_text()) != fingerprint):
        shutil.rmtree(run)
    resumed = run.exists()
    run.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(fingerprint, sort_keys=True))
    return resumed


def fit(train_fn, loop_config: dict, scaling: ScalingArgs, ray_cfg: RayConfig, run_dir: Path, name: str,
        keep: int, fresh: bool = False):
    """Run `train_fn` on Ray Train; returns (Result, resumed)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    available = ray.cluster_resources().get("CPU", 0)
    if scaling.num_workers * scaling.cpus_per_worker > available:
        raise MomeError(f"{name}: {scaling.num_workers} workers x {scaling.cpus_per_worker} CPUs exceeds the "
                        f"cluster's {available:g} CPUs; lower scaling.num_workers or scaling.cpus_per_worker")
    storage = storage_path(ray_cfg, run_dir)
    resumed = prepare_storage(storage, name, loop_config, fresh)
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=scaling.ray(),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep),
        ),
    )
    return trainer.fit(), resumed


def train_teacher(cfg: TeacherConfig, langs: list[str], tokenizer_dir: Path, ray_cfg: RayConfig, run_dir: Path,
                  seed: int, out_dir: Path, fresh: bool = False) -> dict:
    """Train the teacher on the cluster and write its model + tokenizer into `out_dir`; returns metrics."""
    from ray.train import Checkpoint

    name = f"{Path(run_dir).resolve().name}-teacher"
    loop_config = {"teacher": to_dict(cfg), "langs": langs, "tokenizer_dir": str(Path(tokenizer_dir).resolve()),
                   "seed": seed, "name": "teacher"}
    result, resumed = fit(train_fn_per_worker, loop_config, cfg.scaling, ray_cfg, run_dir, name,
                          cfg.train.keep_checkpoints, fresh)
    checkpoint: Checkpoint = result.checkpoint
    with checkpoint.as_directory() as d:
        for f in Path(d).iterdir():
            if f.name != "train_state.pt":
                shutil.copy2(f, out_dir / f.name)
        history = torch.load(Path(d) / "train_state.pt", weights_only=True)["history"]
    load_tokenizer(tokenizer_dir).save_pretrained(str(out_dir))
    return {"final": history[-1], "untrained": history[0], "history": history, "resumed": resumed}
