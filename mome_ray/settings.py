"""The whole run's configuration, composed from each module's own config dataclass.

    cfg = load_settings("configs/small.yaml", ["teacher.train.max_steps=50"])
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mome_ray.cluster import RayConfig
from mome_ray.config import apply_overrides, from_dict, load_yaml
from mome_ray.corpus.build import CorpusConfig
from mome_ray.distill import DistillConfig
from mome_ray.evaluation import EvalConfig
from mome_ray.router.model import RouterConfig
from mome_ray.forgetting import ForgettingConfig
from mome_ray.logit_cache import LogitCacheConfig
from mome_ray.moe_train import MoEConfig
from mome_ray.serving import ServeConfig
from mome_ray.teacher import TeacherConfig
from mome_ray.tokenizer import TokenizerConfig


@dataclass
class Settings:
    run_dir: str = "runs/default"  # every stage writes RUN_DIR/<stage>/
    seed: int = 0
    langs: list[str] = field(default_factory=lambda: ["en", "fr", "de", "py"])  # language codes, in order
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    teacher_logits: LogitCacheConfig = field(default_factory=LogitCacheConfig)  # read when a KD section's teacher is cached
    distill: DistillConfig = field(default_factory=DistillConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    forgetting: ForgettingConfig = field(default_factory=ForgettingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # how tables and claims are scored (test split)
    serve: ServeConfig = field(default_factory=ServeConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def load_settings(path: str | None, overrides: list[str] = ()) -> Settings:
    """Defaults <- YAML file (if any) <- `a.b=c` overrides; unknown keys are an error naming the key."""
    data = load_yaml(path) if path else {}
    return from_dict(Settings, apply_overrides(data, list(overrides)), where="")
