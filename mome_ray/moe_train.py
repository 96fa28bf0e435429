"""JEET and MoE-CE trained with KD from the teacher on Ray Train, one `TorchTrainer` each, concurrently.

    mome moe --config configs/small.yaml                 # trains both, then runs the evaluation grid
    mome moe --config configs/small.yaml moe.gate=true   # MoE-CE with a learned per-expert gate
    mome moe --config configs/small.yaml moe.parts.expert_wpe=true moe.parts.untied_head=true   # the paper's code

Every step draws a balanced batch (an equal share of each language) and routes each sequence to its own
language's stack (`Routing.onehot` of the batch's language labels), so a step updates the stacks that
ran plus the shared embedding/head (and, in MoE-CE, the common stack, which runs for every sequence).
Loss: L = α·CE + β·KD, the distillation step of `kd.kd_step` on the MoE's logits. The MoE is wrapped
for DDP with `find_unused_parameters` (`jeet.DDP_KWARGS`): a rank's batch need not select every stack.

    RUN_DIR/moe/jeet/      JEETModel.save (config.json + model.safetensors) + meta.json
    RUN_DIR/moe/moe-ce/    the same with the common stack
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar


from mome_ray.alpha import AlphaSchedule
from mome_ray.config import from_dict, to_dict
from mome_ray.data import balanced_data
from mome_ray.evaluation import per_language_eval
from mome_ray.kd import KDRecipe, check_teacher, kd_teacher, kd_train
from mome_ray.errors import MomeError
from mome_ray.jeet import DDP_KWARGS, JEETConfig, JEETModel, JEETParts
from mome_ray.models import ModelConfig, n_params
from mome_ray.moe import MoE, Routed, Routing
from mome_ray.storage import RunStore
from mome_ray.tokenizer import load_tokenizer

VARIANTS = {"jeet": False, "moe-ce": True}  # artifact name -> has the common expert


@dataclass
class MoEConfig(KDRecipe):
    # One expert stack: the paper's MoE experts are half its students' depth (3 x 768 vs 6 x 768).
    model: ModelConfig = field(default_factory=lambda: ModelConfig(n_layer=1, n_embd=128, n_head=4))
    gate: bool = False  # MoE-CE: a learned per-expert scalar gate instead of the paper's plain mean
    parts: JEETParts = field(default_factory=JEETParts)  # per-expert wpe / ln_f, untied head (the paper's code)
    top_k: int = 2  # the grid's top-k mixing row
    section: ClassVar[str] = "moe"

    def __post_init__(self):
        super().__post_init__()
        if self.top_k < 1:
            raise MomeError(f"moe.top_k must be >= 1, got {self.top_k}")


def build_jeet(cfg: MoEConfig, langs: list[str], tokenizer_dir: Path, common: bool) -> MoE:
    tok = load_tokenizer(tokenizer_dir)
    return MoE(JEETModel(JEETConfig(list(langs), len(tok), tok.eos_token_id, tok.pad_token_id, cfg.model,
                                    common=common, gate=common and cfg.gate, parts=cfg.parts)))


def train_fn_per_worker(config: dict) -> None:
    """The Ray Train worker loop of JEET or MoE-CE."""
    from mome_ray.worker import start_run, worker_context

    cfg = from_dict(MoEConfig, config["moe"])
    langs, seed, name = config["langs"], config["seed"], config["name"]
    store = RunStore(config["run"])
    tok_dir = store.fetch("tokenizer")  # this node's copies
    rank, world, device = worker_context(cfg.scaling.cpus_per_worker)
    T = cfg.model.n_positions

    # --- data: balanced batches with each block's language; a fixed eval subset per language
    teacher = kd_teacher(cfg, store, langs, tok_dir, device)
    batches, val = balanced_data(tok_dir, langs, T, cfg.train.batch_size, cfg.train.eval_blocks, seed, rank, world,
                                 teacher.train_limit)

    # --- the MoE (DDP tolerates stacks no sequence of a rank's batch selected), optimizer, resume
    run = start_run(lambda: build_jeet(cfg, langs, tok_dir, config["common"]), cfg.train, name, seed, rank,
                    load=lambda d: MoE(JEETModel.load(d)), save=lambda moe, d: moe.experts.save(d),
                    ddp_kwargs=DDP_KWARGS)
    banner = (f"{n_params(run.module) / 1e6:.2f}M params ({len(langs)} stacks"
              f"{' + common' if config['common'] else ''}), KD {cfg.kd_loss} / {cfg.alpha.strategy} alpha")

    # --- train: each sequence through its own language's stack
    kd_train(run, batches, teacher, AlphaSchedule(cfg.alpha, cfg.train.max_steps), cfg, device, name, world,
             lambda: per_language_eval(run.module, val, device, cfg.train), banner,
             route=lambda model, lang_index: Routed(model, routing=Routing.onehot(lang_index, len(langs))))


# ----------------------------------------------------------------------------------------------------------
# Driver side: JEET and MoE-CE, each its own Ray Train run, concurrently; each exported as it finishes.


def variant_config(cfg: MoEConfig, name: str, langs: list[str], seed: int) -> dict:
    """What a trained MoE depends on: a change re-trains it (grid settings do not)."""
    d = to_dict(cfg)
    for key in ("max_parallel", "top_k") + (() if VARIANTS[name] else ("gate",)) + cfg.unused_keys():
        d.pop(key)
    return {"langs": langs, "seed": seed, "moe": d, "variant": name}


def train_moes(cfg: MoEConfig, langs: list[str], store: RunStore, ray_cfg, parents: dict[str, str], seed: int,
               fresh: bool = False, log=print) -> dict[str, dict]:
    """Train JEET and MoE-CE unless up to date; returns {name: meta} of both (in RUN_DIR/moe/<name>/)."""
    from mome_ray.model_runs import ModelRun, train_models

    check_teacher(cfg, store, langs)
    runs = [ModelRun(f"moe/{name}", train_fn_per_worker,
                     {"moe": to_dict(cfg), "langs": langs, "seed": seed, "name": name, "common": common,
                      "run": store.location},
                     cfg.scaling, variant_config(cfg, name, langs, seed), cfg.train.keep_checkpoints)
            for name, common in VARIANTS.items()]
    metas = train_models(store, runs, parents, ray_cfg, seed, fresh, cfg.max_parallel, log)
    return {name: metas[f"moe/{name}"] for name in VARIANTS}
