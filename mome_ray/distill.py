"""Knowledge distillation: small per-language GPT-2 students learn from the teacher, one Ray Train run each.

    mome distill --config configs/small.yaml                          # every language, in parallel
    mome distill --config configs/small.yaml distill.langs=[fr] distill.alpha.strategy=adaptive

Loss per optimizer step: L = α·CE + β·KD (β = 1 − α; `alpha.py` decides α per step; `losses.py` holds
the divergences). The teacher runs under no_grad on the same block. CE, KD, α and β are kept for every
step in the run's `trace`, and go into the artifact's metrics.

What gets trained (`plan`), each its own Ray Train run with its own checkpoints and resume:
    expert-<lang>    KD student on one language              -> RUN_DIR/experts/<lang>/
    nokd-<lang>      same student, α = 1 (CE only), no teacher  -> RUN_DIR/experts/nokd-<lang>/
    multilingual     same student, KD, balanced batches of every language -> RUN_DIR/experts/multilingual/
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from mome_ray.alpha import AlphaConfig, AlphaSchedule
from mome_ray.cluster import ScalingArgs
from mome_ray.config import from_dict
from mome_ray.data import BalancedBatches, eval_blocks, load_blocks
from mome_ray.errors import MomeError
from mome_ray.losses import KD_LOSSES
from mome_ray.models import ModelConfig, build_gpt2, load_lm, n_params
from mome_ray.storage import RunStore
from mome_ray.tokenizer import load_tokenizer
from mome_ray.training import (Progress, TrainConfig, autocast, clip_and_step, eval_metrics, evaluate, lm_loss)


@dataclass
class KDSweepConfig:
    space: str = "tune_spaces/kd.yaml"  # the search space (relative to the working directory)
    lang: str = ""  # the language whose expert is swept ("" = the first of the run's languages)
    max_steps: int = 0  # steps per trial (0 = distill.train.max_steps)
    num_samples: int = 1  # samples of the space (grids are crossed; each sample repeats the grid)
    grace_period: int = 1  # ASHA: evaluations before a trial may be stopped
    max_concurrent: int = 0  # trials at once (0 = as many as the cluster fits)
    mlflow_uri: str = ""  # also log to MLflow at this tracking URI


@dataclass
class KDRecipe:
    """What every KD training run is configured by: the distilled students here and JEET / MoE-CE
    (`moe_train.MoEConfig`); `kd_train` reads these. `section` names the config section in errors."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingArgs = field(default_factory=lambda: ScalingArgs(num_workers=1, cpus_per_worker=1))
    alpha: AlphaConfig = field(default_factory=AlphaConfig)
    kd_loss: str = "reverse_kl"  # reverse_kl (the paper's stated loss), forward_kl, jsd, skew_kl
    temperature: float = 1.0  # softens both distributions in the KD term (with τ² scaling)
    max_parallel: int = 0  # runs at once (0 = as many as the cluster fits)
    section: ClassVar[str] = "distill"

    def __post_init__(self):
        if self.kd_loss not in KD_LOSSES:
            raise MomeError(f"{self.section}.kd_loss '{self.kd_loss}' is not one of {sorted(KD_LOSSES)}")
        if self.temperature <= 0:
            raise MomeError(f"{self.section}.temperature must be > 0, got {self.temperature}")


@dataclass
class DistillConfig(KDRecipe):
    model: ModelConfig = field(default_factory=lambda: ModelConfig(n_layer=2, n_embd=128, n_head=4))
    langs: list[str] = field(default_factory=list)  # experts to train ([] = every language of the run)
    baselines: bool = True  # also train the no-KD students and the multilingual student
    sweep: KDSweepConfig = field(default_factory=KDSweepConfig)


@dataclass
class Student:
    """One model to train: its artifact name, its languages and whether it learns from the teacher."""

    name: str
    langs: list[str]
    kd: bool


def plan(cfg: DistillConfig, run_langs: list[str]) -> list[Student]:
    """The students `mome distill` trains: experts for `cfg.langs`, then the baselines."""
    langs = cfg.langs or run_langs
    unknown = [lang for lang in langs if lang not in run_langs]
    if unknown:
        raise MomeError(f"distill.langs {unknown} are not languages of this run ({run_langs}); add them to "
                        f"`langs` and rebuild the corpus, or use `mome add-expert`")
    students = [Student(lang, [lang], kd=True) for lang in langs]
    if cfg.baselines:
        # Longest first (the KD runs also run the teacher), so the short CE-only runs fill the last slots.
        students.append(Student("multilingual", list(run_langs), kd=True))
        students += [Student(f"nokd-{lang}", [lang], kd=False) for lang in langs]
    return students


def kd_step(model, teacher, opt, sched, ids: torch.Tensor, alpha: float, beta: float, kd_fn, temperature: float,
            train: TrainConfig, device: torch.device) -> tuple[float, float | None]:
    """One optimizer step of α·CE + β·KD on (B, T) ids; returns (CE, KD) (KD None without a teacher).

    With β = 0 the KD term is computed for the log only (no_grad), so α = 1 is exactly CE training.
    """
    with autocast(device, train.bf16):
        logits = model(input_ids=ids).logits
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids).logits
    ce = lm_loss(logits, ids)
    kd = None
    if teacher_logits is not None:
        # Position t predicts token t+1 in both models; the last position has no target, like CE.
        with torch.set_grad_enabled(beta > 0):
            kd = kd_fn(logits[:, :-1], teacher_logits[:, :-1], temperature=temperature)
    loss = alpha * ce  # ×1.0 is exact: α = 1, β = 0 gives the same gradients as plain CE
    if kd is not None and beta > 0:
        loss = loss + beta * kd
    loss.backward()
    clip_and_step(model, opt, sched, train.grad_clip)
    return ce.item(), None if kd is None else kd.item()


def teacher_dtype(device: torch.device, bf16: bool) -> torch.dtype:
    """bf16 on CUDA when training autocasts to bf16 (half the teacher's memory; autocast ran it in bf16
    anyway), float32 otherwise (CPUs run bf16 matmuls slowly)."""
    return torch.bfloat16 if bf16 and device.type == "cuda" else torch.float32


def frozen_teacher(model: torch.nn.Module, device: torch.device, bf16: bool) -> torch.nn.Module:
    """The KD teacher: on `device`, in `teacher_dtype`, in eval mode, with no gradients."""
    return model.to(device=device, dtype=teacher_dtype(device, bf16)).eval().requires_grad_(False)


def new_trace() -> dict[str, list]:
    return {"step": [], "ce": [], "kd": [], "alpha": [], "beta": []}


def train_fn_per_worker(config: dict) -> None:
    """The Ray Train worker loop of one student (an expert, a no-KD student or the multilingual one)."""
    from mome_ray.worker import start_run, worker_context

    cfg = from_dict(DistillConfig, config["distill"])
    student = Student(**config["student"])
    store, seed, name = RunStore(config["run"]), config["seed"], config["name"]
    tok_dir = store.fetch("tokenizer")  # this node's copies
    rank, world, device = worker_context(cfg.scaling.cpus_per_worker)
    T = cfg.model.n_positions

    batches = BalancedBatches([load_blocks(tok_dir, "train", l, T) for l in student.langs], cfg.train.batch_size,
                              seed, rank, world)
    val = {l: eval_blocks(load_blocks(tok_dir, "val", l, T), cfg.train.eval_blocks, rank, world)
           for l in student.langs}
    teacher = None
    if student.kd:
        teacher = frozen_teacher(load_lm(store.fetch("teacher"), tok_dir), device, cfg.train.bf16)

    def build():
        tok = load_tokenizer(tok_dir)
        return build_gpt2(cfg.model, len(tok), tok.eos_token_id, tok.pad_token_id)

    run = start_run(build, cfg.train, name, seed, rank)
    schedule = AlphaSchedule(cfg.alpha if student.kd else AlphaConfig("fixed", 1.0), cfg.train.max_steps)
    banner = (f"{n_params(run.model) / 1e6:.2f}M params, langs {student.langs}, "
              f"{'KD ' + cfg.kd_loss + ' / ' + cfg.alpha.strategy + ' alpha' if student.kd else 'CE only'}")
    kd_train(run, batches, teacher, schedule, cfg, device, name, world,
             lambda: evaluate(run.model, val, device, cfg.train.batch_size, cfg.train.bf16), banner)


def kd_train(run, batches, teacher, schedule: AlphaSchedule, cfg: KDRecipe, device, name: str, world: int,
             evaluate_fn, banner: str, route=None) -> None:
    """The KD loop every distilled model shares (students here, JEET / MoE-CE in `moe_train`).

    A resumed run gets its α schedule back; a fresh one is evaluated at step 0 (the untrained baseline)
    and rank 0 prints `banner`. Then from `run.step` to `cfg.train.max_steps`: α·CE + β·KD steps, the
    per-step trace (CE, KD, α, β), progress lines, and at every evaluation `evaluate_fn()` -> {lang: loss}
    reported with a checkpoint.
    `route(model, lang_index)` wraps the model per batch (the MoEs route each sequence to its stack).
    """
    from mome_ray.worker import report

    if run.resumed:
        schedule.load_state_dict(run.extra["alpha_state"])
    else:
        run.history = [eval_metrics(0, evaluate_fn())]
        run.extra = {"trace": new_trace()}
        if run.rank == 0:
            print(f"[{name}] {banner}, {cfg.train.max_steps} steps", flush=True)
    kd_fn, trace = KD_LOSSES[cfg.kd_loss], run.extra["trace"]
    run.model.train()
    progress = Progress(name, cfg.train.max_steps, cfg.train.batch_size * cfg.model.n_positions * world,
                        cfg.train.log_every, run.rank == 0)
    for step in range(run.step, cfg.train.max_steps):
        ids, lang_index = batches.batch(step)
        model = route(run.model, lang_index.to(device)) if route else run.model
        alpha, beta = schedule.weights(step)
        progress.tick()
        ce, kd = kd_step(model, teacher, run.opt, run.sched, ids.to(device), alpha, beta, kd_fn, cfg.temperature,
                         cfg.train, device)
        if kd is not None:
            schedule.update(ce, kd)
        for key, value in zip(trace, (step + 1, ce, kd, alpha, beta)):
            trace[key].append(value)
        progress.tock(step, {"ce": ce, **({"kd": kd, "alpha": alpha} if kd is not None else {})})

        if (step + 1) % cfg.train.eval_every == 0 or step + 1 == cfg.train.max_steps:
            metrics = eval_metrics(step + 1, evaluate_fn())
            metrics.update(ce=ce, kd=kd if kd is not None else float("nan"), alpha=alpha, beta=beta,
                           tokens_per_s=progress.tokens_per_s)
            run.history.append(metrics)
            run.extra = {"trace": trace, "alpha_state": schedule.state_dict()}
            report(run, step + 1, metrics)


# ----------------------------------------------------------------------------------------------------------
# Driver side: every student its own Ray Train run, concurrently; each exported as it finishes.


def student_config(cfg: DistillConfig, student: Student, run_langs: list[str], seed: int) -> dict:
    """What a student's artifact depends on: a change re-trains it, anything else reuses it."""
    from mome_ray.config import to_dict

    d = to_dict(cfg)
    for key in ("langs", "baselines", "max_parallel", "sweep") + (() if student.kd else ("alpha", "kd_loss",
                                                                                          "temperature")):
        d.pop(key)
    return {"langs": run_langs, "seed": seed, "distill": d, "student": vars(student)}


def loop_config(cfg: DistillConfig, student: Student, store: RunStore, seed: int, name: str) -> dict:
    from mome_ray.config import to_dict

    return {"distill": to_dict(cfg), "student": vars(student), "seed": seed, "name": name, "run": store.location}


def check_teacher(cfg: DistillConfig, store: RunStore) -> None:
    from mome_ray.artifacts import read_meta

    teacher = read_meta(store, "teacher")
    context = teacher["config"]["teacher"]["model"]["n_positions"]
    if cfg.model.n_positions > context:
        raise MomeError(f"distill.model.n_positions ({cfg.model.n_positions}) exceeds the teacher's context "
                        f"({context}); the teacher must see the student's whole block")


def distill_students(cfg: DistillConfig, run_langs: list[str], store: RunStore, ray_cfg, seed: int,
                     fresh: bool = False, log=print) -> dict[str, dict]:
    """Train every planned student that is not up to date; returns {name: meta} of all planned students."""
    from mome_ray.artifacts import is_complete, read_meta, stage_writer, write_meta
    from mome_ray.launch import TrainJob, export_checkpoint, fit_many, run_name

    check_teacher(cfg, store)
    parents = {p: read_meta(store, p)["created"] for p in ("tokenizer", "teacher")}
    students = {s.name: s for s in plan(cfg, run_langs)}
    configs = {name: student_config(cfg, s, run_langs, seed) for name, s in students.items()}
    jobs = []
    for name, student in students.items():
        stage = f"experts/{name}"
        if not fresh and is_complete(store, stage, configs[name]) and read_meta(store, stage)["parents"] == parents:
            log(f"[distill] {name}: up to date in {store.uri(stage)}, skipped")
            continue
        loop = loop_config(cfg, student, store, seed, name)
        jobs.append(TrainJob(run_name(store, name, loop, parents), train_fn_per_worker, loop, cfg.scaling,
                             cfg.train.keep_checkpoints, fresh))
    tokenizer_dir = store.fetch("tokenizer")

    def export(job, result, resumed: bool) -> None:
        name = job.loop_config["name"]
        with stage_writer(store, f"experts/{name}") as out:
            state = export_checkpoint(result, out)
            load_tokenizer(tokenizer_dir).save_pretrained(str(out))
            metrics = {"final": state["history"][-1], "untrained": state["history"][0],
                       "history": state["history"], "trace": state["trace"], "resumed": resumed}
            write_meta(out, f"experts/{name}", configs[name], metrics, parents, seed)

    fit_many(jobs, ray_cfg, store, on_done=export, max_parallel=cfg.max_parallel, log=log)
    return {name: read_meta(store, f"experts/{name}") for name in students}
