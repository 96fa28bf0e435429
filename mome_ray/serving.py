"""What the Serve app serves, without Ray: the served run (`ServeSpec`), one served LM (`ServedLM`), config.

    spec = load_spec("runs/small")                    # the variant serve.model names (default: the grid's best)
    moe = load_moe({n: fetched(stage) for n, stage in spec.parts.items()}, spec.variant)   # moe.MoE, as the grid's
    lm = ServedLM("runs/small/teacher")               # one HF LM (the teacher), loaded from safetensors only
    lm.score([[12, 7, 99]])                           # per-token log p(next token), one list per row
    for step in lm.generate([GenRequest(ids, 32, temperature=0.8, top_p=0.95, seed=1)]):
        ...                                           # one new token per request per step (None once done)

`serve/app.py` puts the MoE in one deployment (the same `moe.MoE` the evaluation grid scores: routing rules,
top-k mixing and generation live there), the teacher's `ServedLM` in another and the router in the ingress.
The teacher's generation is batched across requests of different lengths (left padding + explicit
positions) with a KV cache, and each request samples from its own seeded generator, so a seed gives the
same text alone or in a batch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mome_ray.errors import MomeError
from mome_ray.jeet import COMMON
from mome_ray.moe import sample_next

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
    batch_wait_timeout_s: float = 0.005
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
    limits: ServeLimits = field(default_factory=ServeLimits)
    router: DeploymentArgs = field(default_factory=lambda: DeploymentArgs(num_cpus=0.25, max_batch_size=32))
    moe: DeploymentArgs = field(default_factory=lambda: DeploymentArgs(num_cpus=0.5))  # the MoE: every expert
    baseline: DeploymentArgs = field(default_factory=DeploymentArgs)  # the teacher

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


@dataclass
class GenRequest:
    ids: list[int]  # the prompt's token ids (at least one)
    max_new_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    eos_id: int | None = None  # stop there (the MoE; a ServedLM stops at its model's own eos)


class ServedLM:
    """One causal LM from a safetensors directory, for batched scoring and generation on CPU or GPU."""

    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu"):
        from transformers import AutoModelForCausalLM

        model_dir = Path(model_dir)
        check_model_dir(model_dir.name, model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), use_safetensors=True).to(device).eval()
        self.model_dir, self.device = model_dir, torch.device(device)
        self.version = file_version(model_dir / "model.safetensors")
        cfg = self.model.config
        self.n_positions, self.vocab_size, self.eos_id = cfg.n_positions, cfg.vocab_size, cfg.eos_token_id
        self.pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        self.params = sum(p.numel() for p in self.model.parameters())

    def info(self) -> dict:
        return {"version": self.version, "params": self.params, "n_positions": self.n_positions,
                "model_dir": str(self.model_dir)}

    @torch.inference_mode()
    def score(self, rows: list[list[int]]) -> list[list[float]]:
        """Per row, log p(token t+1 | tokens <= t) for each of its len − 1 next tokens."""
        ids, mask, pos = self._pad(rows, left=False)
        logp = F.log_softmax(self.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float(), -1)
        picked = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
        return [picked[i, : len(r) - 1].tolist() for i, r in enumerate(rows)]

    @torch.inference_mode()
    def generate(self, reqs: list[GenRequest]) -> Iterator[list[int | None]]:
        """Per step, each request's next token, or None once it is done (eos or its max_new_tokens)."""
        for r in reqs:
            if not r.ids or len(r.ids) + r.max_new_tokens > self.n_positions:
                raise MomeError(f"a prompt of {len(r.ids)} tokens + {r.max_new_tokens} new tokens does not fit "
                                f"this model's context of {self.n_positions} tokens")
        gens = [torch.Generator().manual_seed(r.seed) for r in reqs]
        ids, mask, pos = self._pad([r.ids for r in reqs], left=True)
        done = [False] * len(reqs)
        past, step = None, 0
        while not all(done):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1].float().cpu()
            nxt = []
            for i, r in enumerate(reqs):
                if done[i]:
                    nxt.append(None)
                    continue
                tok = int(sample_next(logits[i: i + 1], r.temperature, r.top_p, gens[i])[0])
                nxt.append(tok)
                done[i] = tok == self.eos_id or step + 1 >= r.max_new_tokens
            yield nxt
            step += 1
            ids = torch.tensor([[t if t is not None else self.pad_id] for t in nxt], device=self.device)
            mask = torch.cat([mask, torch.ones_like(ids)], 1)
            pos = pos[:, -1:] + 1

    def _pad(self, rows: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(t.to(self.device) for t in pad_rows(rows, self.pad_id, left))


def pad_rows(rows: list[list[int]], pad_id: int = 0, left: bool = False) -> tuple[torch.Tensor, ...]:
    """(ids, mask, positions) of rows padded to one length (left for generation, so every row's last token is
    at the end); positions count real tokens only, whatever the padding."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span], mask[i, span] = torch.tensor(r, dtype=torch.long), 1
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)
