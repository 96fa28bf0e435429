"""What the Serve app serves, without Ray: the served run (`ServeSpec`), its models, the `serve:` config.

    spec = load_spec("runs/small")                    # the variant serve.model names (default: the grid's best)
    moe = load_moe({n: fetched(stage) for n, stage in spec.parts.items()}, spec.variant)   # moe.MoE, as the grid's
    teacher = load_moe({"teacher": "runs/small/teacher"}, "ple")                           # a one-model PLE

`serve/app.py` puts the MoE in one deployment (the same `moe.MoE` the evaluation grid scores: routing rules,
top-k mixing and generation live there), the teacher in another of the same kind and the router in the
ingress. Both generate with `decoding.Decoder` (continuous batching, a KV cache, a seeded generator per
request: a seed gives the same text alone or in a batch).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mome_ray.errors import MomeError
from mome_ray.jeet import COMMON

TEACHER = "teacher"
TOKEN_ENV = "MOME_SERVE_TOKEN"  # the default env var holding the HTTP API's bearer token


@dataclass
class DeploymentArgs:
    """Serve options of one deployment (the router ingress or an expert)."""

    num_replicas: int = 1  # ignored when autoscaling is set
    num_cpus: float = 0.25  # per replica: fractional, so 4 experts + teacher + router fit 2 cores
    num_gpus: float = 0.0
    max_ongoing_requests: int = 64  # Serve's default (5) collapses throughput under concurrency (DESIGN.md)
    max_batch_size: int = 8  # @serve.batch
    # How long a batch waits for more requests after its first. 0: a batch is what queued while the last one ran,
    # so a lone request never waits (c1 score p50 32 -> 21 ms) and batches still fill under load (BENCHMARKS.md).
    batch_wait_timeout_s: float = 0.0
    autoscaling: dict[str, Any] | None = None  # Serve autoscaling_config, e.g. {min_replicas: 1, max_replicas: 4}

    def __post_init__(self):
        if self.num_replicas < 1 or self.num_cpus < 0 or self.num_gpus < 0 or self.max_ongoing_requests < 1 \
                or self.max_batch_size < 1 or self.batch_wait_timeout_s < 0:
            raise MomeError("serve deployment options need num_replicas >= 1, num_cpus/num_gpus >= 0, "
                            "max_ongoing_requests >= 1, max_batch_size >= 1 and batch_wait_timeout_s >= 0")

    def options(self, name: str, access_log: bool = False) -> dict:
        """`Deployment.options(...)` keyword arguments."""
        opts = {"name": name, "max_ongoing_requests": self.max_ongoing_requests,
                "ray_actor_options": {"num_cpus": self.num_cpus, **({"num_gpus": self.num_gpus} if self.num_gpus else {})},
                "logging_config": {"enable_access_log": access_log}}
        if self.autoscaling:
            opts["autoscaling_config"] = dict(self.autoscaling)
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


@dataclass
class ServeLimits:
    """Bounds on a request; over them is a 4xx that names the bound."""

    max_prompt_chars: int = 8000
    max_prompt_tokens: int = 512  # also bounded by the experts' context (n_positions)
    max_new_tokens: int = 256  # also bounded by the context: prompt + new tokens <= n_positions
    max_batch: int = 64  # texts in one /v1/route request
    max_body_bytes: int = 1_000_000


@dataclass
class ServeConfig:
    artifact: str = "moe"  # RUN_DIR/<artifact>/: the MoE to serve (e.g. moe_plus_es after add-expert)
    model: str = "best"  # ple | jeet | moe-ce | best (the grid's best, routed top-1 as trained: `load_spec`)
    teacher: bool = True  # also deploy the teacher (request it with expert="teacher"): the baseline to compare
    host: str = "127.0.0.1"  # `mome serve` binds loopback unless told otherwise
    port: int = 8000
    # The bearer token required on /v1/* and /readyz: a secret the cluster has, never a value in a config. Each
    # ingress replica reads it in its own process: from `token_file` when set (e.g. a mounted secret), else
    # from the env var `token_env` (set on the nodes, or in the deployment's runtime_env). None = no auth.
    token_env: str = TOKEN_ENV
    token_file: str = ""
    access_log: bool = False  # per-request access logs (off: they cost throughput, DESIGN.md)
    # How generations share a decode batch (decoding.py): "continuous" (a request joins the running batch at the
    # next step, leaves when done) or "static" (a batch starts together; a new request waits for its longest).
    batching: str = "continuous"
    # Many experts (PLE): N > 0 serves them from one multiplexed deployment, `experts`, at most N loaded per replica
    # (least recently used evicted; a request loads its expert on a replica that lacks it). 0: `moe` holds all.
    multiplex: int = 0
    hot: list[str] = field(default_factory=list)  # with multiplex: experts with a deployment of their own
    limits: ServeLimits = field(default_factory=ServeLimits)
    router: DeploymentArgs = field(default_factory=lambda: DeploymentArgs(num_cpus=0.25, max_batch_size=32))
    moe: DeploymentArgs = field(default_factory=lambda: DeploymentArgs(num_cpus=0.5))  # the MoE: every expert
    baseline: DeploymentArgs = field(default_factory=DeploymentArgs)  # the teacher

    def __post_init__(self):
        from mome_ray.decoding import ADMITS

        if self.batching not in ADMITS:
            raise MomeError(f"serve.batching '{self.batching}' is not one of {list(ADMITS)}")
        if self.multiplex < 0:
            raise MomeError(f"serve.multiplex is how many experts a pool replica holds (0: no pool), got {self.multiplex}")

    def token(self) -> str:
        return read_token(self.token_env, self.token_file)


def read_token(token_env: str, token_file: str) -> str:
    """The bearer token where this process runs: the file `token_file` when set, else $`token_env` ("" = none)."""
    if not token_file:
        return os.environ.get(token_env, "") if token_env else ""
    try:
        token = Path(token_file).read_text().strip()
    except OSError as e:
        raise MomeError(f"serve.token_file '{token_file}' cannot be read here ({e.strerror}): the token file must "
                        f"exist on every node that runs the ingress") from None
    if not token:
        raise MomeError(f"serve.token_file '{token_file}' is empty: write the bearer token in it")
    return token


VARIANTS = {"ple": "PLE", "jeet": "JEET", "moe-ce": "MoE-CE"}  # serve.model -> the evaluation grid's model label
MODELS = ("best", *VARIANTS)
# The grid row a variant is chosen by (serve.model=best): routed top-1, as it was trained (MoE-CE with its common).
AS_TRAINED = {"ple": "top-1", "jeet": "top-1", "moe-ce": "top-1 + common"}


@dataclass
class ServeSpec:
    """A run's servable parts, as artifacts of its storage: the MoE variant's (PLE: one model per expert;
    JEET / MoE-CE: one model), the teacher, the router and the tokenizer. Replicas fetch them from `run`
    (a URI or an absolute path) on their own node."""

    run: str
    variant: str  # ple | jeet | moe-ce
    parts: dict[str, str]  # artifact per part: PLE {expert: "experts/fr", ...}; JEET / MoE-CE {variant: "moe/jeet"}
    langs: list[str]  # the routable experts, in the MoE's order
    has_common: bool  # MoE-CE, or a PLE with a common model
    n_positions: int  # the MoE's context (the shortest of its parts)
    router: str | None  # the router artifact, e.g. "router"
    teacher: str | None  # the teacher artifact (the baseline), or None
    versions: dict[str, str]  # part (and teacher) -> the weights' sha256 prefix (`check_artifact`)
    why: str = ""  # how the variant was chosen (said at start-up)
    tokenizer: str = "tokenizer"

    @property
    def members(self) -> list[str]:
        return self.langs + ([COMMON] if self.has_common else [])


def load_spec(run, artifact: str = "moe", teacher: bool = True, model: str = "best") -> ServeSpec:
    """What `serve.model` names in MoE artifact RUN_DIR/<artifact>/ (ple.json, written by `mome moe` / `mome
    add-expert`; jeet/ and moe-ce/ from `mome moe`): `best` is the variant with the lowest mean test perplexity
    routed top-1, as trained, in that artifact's grid.csv (PLE when there is no grid)."""
    from mome_ray.artifacts import as_store

    if model not in MODELS:
        raise MomeError(f"serve.model '{model}' is not one of {list(MODELS)}")
    store = as_store(run)
    index = store.uri(artifact, "ple.json")
    raw = store.read_bytes(f"{artifact}/ple.json")
    if raw is None:
        raise MomeError(f"no MoE artifact at '{index}'; run `mome moe --config ...` (or `mome pipeline`) "
                        f"for this run first")
    try:
        ple = json.loads(raw)
        experts = {str(k): str(v) for k, v in ple["experts"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise MomeError(f"'{index}' is not a valid MoE artifact ({e}); re-run `mome moe`") from None
    variant, why = (model, f"serve.model={model}") if model != "best" else best_variant(store, artifact)
    if variant == "ple":
        parts, langs = experts, [n for n in experts if n != COMMON]
        has_common = COMMON in experts
        contexts = [model_config(store, stage)["n_positions"] for stage in parts.values()]
    else:
        stage = f"{artifact}/{variant}"
        if not store.exists(f"{stage}/config.json"):
            raise MomeError(f"serve.model={variant}: no {VARIANTS[variant]} model at '{store.uri(stage)}' "
                            f"(`mome moe` trains it; `mome add-expert` builds a PLE only): serve serve.model=ple")
        cfg = model_config(store, stage)
        parts, langs, has_common, contexts = {variant: stage}, list(cfg["langs"]), bool(cfg["common"]), \
            [cfg["model"]["n_positions"]]
    if not langs:
        raise MomeError(f"'{index}' lists no language experts")
    has_teacher = teacher and store.exists(f"{TEACHER}/config.json")
    served = {**parts, **({TEACHER: TEACHER} if has_teacher else {})}
    versions = {name: check_artifact(store, name, stage) for name, stage in served.items()}
    return ServeSpec(store.location, variant, parts, langs, has_common, min(contexts), ple.get("router") or None,
                     TEACHER if has_teacher else None, versions, why)


def best_variant(store, artifact: str) -> tuple[str, str]:
    """(variant, why): the grid's best routed top-1 row, as trained, among the variants the artifact has."""
    import csv
    import io

    raw = store.read_bytes(f"{artifact}/grid.csv")
    if raw is None:
        return "ple", f"no {artifact}/grid.csv to choose by: PLE"
    scores = {}
    for row in csv.DictReader(io.StringIO(raw.decode())):
        for variant, label in VARIANTS.items():
            routed = row["row"].split(" ", 1)[-1] == AS_TRAINED[variant]  # "router top-1" or "oracle top-1"
            if row["model"] == label and routed and row.get("mean_ppl") and \
                    (variant == "ple" or store.exists(f"{artifact}/{variant}/config.json")):
                scores[variant] = float(row["mean_ppl"])
    if not scores:
        return "ple", f"no routed top-1 rows in {artifact}/grid.csv: PLE"
    best = min(scores, key=scores.get)
    shown = ", ".join(f"{VARIANTS[v]} {p:,.1f}" for v, p in sorted(scores.items(), key=lambda kv: kv[1]))
    return best, f"the best routed top-1 mean test perplexity in {artifact}/grid.csv: {shown}"


def model_config(store, stage: str) -> dict:
    raw = store.read_bytes(f"{stage}/config.json")
    if raw is None:
        raise MomeError(f"no model at '{store.uri(stage)}' (config.json missing)")
    return json.loads(raw)


def load_moe(spec_parts: dict[str, Path], variant: str, device: str | torch.device = "cpu"):
    """The served MoE from its parts' local directories (`ServeSpec.parts`, fetched): PLE's models or the
    JEET / MoE-CE model, safetensors only, in eval mode, with no router (the ingress routes)."""
    from mome_ray.jeet import JEETModel
    from mome_ray.moe import MoE, load_ple

    for name, d in spec_parts.items():
        check_model_dir(name, Path(d))  # safetensors only: load_ple then reads those
    if variant == "ple":
        bank = load_ple(spec_parts)
    else:
        (d,) = spec_parts.values()
        bank = JEETModel.load(Path(d))
    return MoE(bank).to(device).eval()


def check_artifact(store, name: str, stage: str) -> str:
    """Check a served model artifact (safetensors only); returns its version (the weights' sha256, 12 hex)."""
    if not store.remote:
        d = Path(store.location, stage)
        check_model_dir(name, d)
        return file_version(d / "model.safetensors")
    files = (store.meta(stage) or {}).get("files") or {}
    if "config.json" not in files or "model.safetensors" not in files:
        raise MomeError(f"expert '{name}': '{store.uri(stage)}' has no config.json + model.safetensors; only "
                        f"safetensors models are served (distil it again with this version of mome)")
    return files["model.safetensors"]["sha256"][:12]


def check_model_dir(name: str, d: Path) -> None:
    """Only safetensors weights are served (a pickled .bin could run code when loaded)."""
    if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
        raise MomeError(f"expert '{name}': '{d}' has no config.json + model.safetensors; only safetensors "
                        f"models are served (distil it again with this version of mome)")


def file_version(path: Path) -> str:
    """The first 12 hex digits of the file's sha256: what `/v1/experts` reports as an expert's version."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]
