"""Knowledge distillation: small per-language GPT-2 students learn from the teacher, one Ray Train run each.

    mome distill --config configs/small.yaml                          # every language, in parallel
    mome distill --config configs/small.yaml distill.langs=[fr] distill.alpha.strategy=adaptive

Each student trains with the KD engine of `kd.py` (α·CE + β·KD; the CE-only students with α = 1).

What gets trained (`plan`), each its own Ray Train run with its own checkpoints and resume:
    expert-<lang>    KD student on one language              -> RUN_DIR/experts/<lang>/
    nokd-<lang>      same student, α = 1 (CE only), no teacher  -> RUN_DIR/experts/nokd-<lang>/
    multilingual     same student, KD, balanced batches of every language -> RUN_DIR/experts/multilingual/
                     (equal compute: as many steps as one expert, so 1/len(langs) of its tokens per language)
    multilingual-tokens  (distill.equal_tokens) the same, len(langs)x the steps: equal tokens per language
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mome_ray.alpha import AlphaConfig, AlphaSchedule
from mome_ray.config import from_dict
from mome_ray.data import BalancedBatches, eval_blocks, load_blocks
from mome_ray.errors import MomeError
from mome_ray.kd import LOSS_PARAMS, KDRecipe, check_teacher, kd_teacher, kd_train
from mome_ray.models import ModelConfig, build_gpt2, n_params
from mome_ray.storage import RunStore
from mome_ray.tokenizer import load_tokenizer
from mome_ray.training import evaluate


@dataclass
class KDSweepConfig:
    space: str = "tune_spaces/kd.yaml"  # the search space (relative to the working directory)
    lang: str = ""  # the language whose expert is swept ("" = the first of the run's languages)
    max_steps: int = 0  # steps per trial (0 = distill.train.max_steps)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # every setting runs with each (paired arms)
    num_samples: int = 1  # samples of the space (grids are crossed; each sample repeats the grid)
    early_stop: bool = False  # ASHA; off for the claims' comparisons (every arm runs every step)
    grace_period: int = 1  # ASHA: evaluations before a trial may be stopped
    max_concurrent: int = 0  # trials at once (0 = as many as the cluster fits)
    mlflow_uri: str = ""  # also log to MLflow at this tracking URI


@dataclass
class DistillConfig(KDRecipe):
    model: ModelConfig = field(default_factory=lambda: ModelConfig(n_layer=2, n_embd=128, n_head=4))
    langs: list[str] = field(default_factory=list)  # experts to train ([] = every language of the run)
    baselines: bool = True  # also train the no-KD students and the multilingual student (equal compute)
    equal_tokens: bool = False  # and a multilingual student trained len(langs)x longer (equal tokens per language)
    sweep: KDSweepConfig = field(default_factory=KDSweepConfig)


@dataclass
class Student:
    """One model to train: its artifact name, its languages and whether it learns from the teacher."""

    name: str
    langs: list[str]
    kd: bool
    steps: int = 0  # optimizer steps (0 = distill.train.max_steps)


def plan(cfg: DistillConfig, run_langs: list[str]) -> list[Student]:
    """The students `mome distill` trains: experts for `cfg.langs`, then the baselines."""
    langs = cfg.langs or run_langs
    unknown = [lang for lang in langs if lang not in run_langs]
    if unknown:
        raise MomeError(f"distill.langs {unknown} are not languages of this run ({run_langs}); add them to "
                        f"`langs` and rebuild the corpus, or use `mome add-expert`")
    students = [Student(lang, [lang], kd=True) for lang in langs]
    if cfg.baselines:
        # Longest first (KD runs cost more), so the short CE-only runs fill the last slots.
        if cfg.equal_tokens:  # as many tokens of each language as its expert saw: len(langs)x the steps
            students.append(Student("multilingual-tokens", list(run_langs), True, cfg.train.max_steps * len(run_langs)))
        students.append(Student("multilingual", list(run_langs), kd=True))
        students += [Student(f"nokd-{lang}", [lang], kd=False) for lang in langs]
    return students


def train_fn_per_worker(config: dict) -> None:
    """The Ray Train worker loop of one student (an expert, a no-KD student or the multilingual one)."""
    from mome_ray.worker import start_run, worker_context

    cfg = from_dict(DistillConfig, config["distill"])
    student = Student(**config["student"])
    if student.steps:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=student.steps))
    store, seed, name = RunStore(config["run"]), config["seed"], config["name"]
    tok_dir = store.fetch("tokenizer")  # this node's copies
    rank, world, device = worker_context(cfg.scaling.cpus_per_worker)
    T = cfg.model.n_positions

    # The CE-only students train on the same blocks as the KD ones (those a cached teacher covers).
    teacher = kd_teacher(cfg, store, student.langs, tok_dir, device) if student.kd or cfg.teacher == "cached" else None
    limit = teacher.train_limit if teacher else lambda lang: 0
    batches = BalancedBatches([load_blocks(tok_dir, "train", l, T, limit(l)) for l in student.langs],
                              cfg.train.batch_size, seed, rank, world)
    val = {l: eval_blocks(load_blocks(tok_dir, "val", l, T), cfg.train.eval_blocks, rank, world)
           for l in student.langs}
    if not student.kd:
        teacher = None

    def build():
        tok = load_tokenizer(tok_dir)
        return build_gpt2(cfg.model, len(tok), tok.eos_token_id, tok.pad_token_id)

    run = start_run(build, cfg.train, name, seed, rank)
    schedule = AlphaSchedule(cfg.alpha if student.kd else AlphaConfig("fixed", 1.0), cfg.train.max_steps)
    banner = (f"{n_params(run.model) / 1e6:.2f}M params, langs {student.langs}, "
              f"{'KD ' + cfg.kd_loss + ' / ' + cfg.alpha.strategy + ' alpha' if student.kd else 'CE only'}")
    kd_train(run, batches, teacher, schedule, cfg, device, name, world,
             lambda: evaluate(run.model, val, device, cfg.train.batch_size, cfg.train.bf16), banner)
    if config.get("report_test"):
        report_test(run, tok_dir, student.langs, T, config["report_test"], device, world, cfg.train)


def report_test(run, tok_dir, langs: list[str], T: int, max_blocks: int, device, world: int, train) -> None:
    """One last report (no checkpoint) of the final model on the test split: what sweep trials are compared by
    (`evaluation.eval_set` blocks: the whole split, or `max_blocks` evenly spaced; sharded across ranks)."""
    import ray.train

    from mome_ray.evaluation import eval_set
    from mome_ray.training import perplexity

    test = {l: eval_set(tok_dir, l, T, "test", max(max_blocks, 0)).blocks[run.rank::world] for l in langs}
    loss = evaluate(run.model, test, device, train.batch_size, train.bf16)
    mean = sum(loss.values()) / len(loss)
    ray.train.report(run.history[-1] | {"test_loss": mean, "test_ppl": perplexity(mean)})


# ----------------------------------------------------------------------------------------------------------
# Driver side: every student its own Ray Train run, concurrently; each exported as it finishes.


def student_config(cfg: DistillConfig, student: Student, run_langs: list[str], seed: int) -> dict:
    """What a student's artifact depends on: a change re-trains it, anything else reuses it."""
    from mome_ray.config import to_dict

    d = to_dict(cfg)
    kd_keys = ("alpha", "kd_loss", "temperature", *(key for key, _ in LOSS_PARAMS.values()))
    for key in {"langs", "baselines", "equal_tokens", "max_parallel", "sweep", *cfg.unused_keys(),
                *(() if student.kd else kd_keys)}:
        d.pop(key)
    return {"langs": run_langs, "seed": seed, "distill": d, "student": vars(student)}


def loop_config(cfg: DistillConfig, student: Student, store: RunStore, seed: int, name: str) -> dict:
    from mome_ray.config import to_dict

    return {"distill": to_dict(cfg), "student": vars(student), "seed": seed, "name": name, "run": store.location}


def distill_students(cfg: DistillConfig, run_langs: list[str], store: RunStore, ray_cfg, parents: dict[str, str],
                     seed: int, fresh: bool = False, log=print) -> dict[str, dict]:
    """Train every planned student that is not up to date; returns {name: meta} of all planned students."""
    from mome_ray.model_runs import ModelRun, train_models

    students = plan(cfg, run_langs)
    check_teacher(cfg, store, sorted({lang for s in students for lang in s.langs}))

    def with_tokenizer(out) -> None:  # a student loads alone in AutoTokenizer too
        load_tokenizer(store.fetch("tokenizer")).save_pretrained(str(out))

    runs = [ModelRun(f"experts/{s.name}", train_fn_per_worker, loop_config(cfg, s, store, seed, s.name), cfg.scaling,
                     student_config(cfg, s, run_langs, seed), cfg.train.keep_checkpoints, with_tokenizer)
            for s in students]
    metas = train_models(store, runs, parents, ray_cfg, seed, fresh, cfg.max_parallel, log)
    return {s.name: metas[f"experts/{s.name}"] for s in students}
