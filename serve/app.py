"""The Ray Serve application: a router ingress (FastAPI) composed with one deployment per expert.

    mome serve runs/small                                   # local, 127.0.0.1:8000
    serve run serve.app:build_app run_dir=runs/small        # the same with Serve's CLI
    serve deploy serve/config.yaml                          # on a running cluster

Deployments (names as in serve/config.yaml): `router` (the ingress: tokenizer + router, the HTTP API) and
`expert-<name>` for each language expert, the common expert when the MoE has one and the teacher (the
baseline). The ingress awaits its expert handles; it never blocks on them. Routing texts in the ingress
and scoring / generating in each expert are batched across concurrent requests (`@serve.batch`).

An expert loads its model in `reconfigure` from its `user_config` ({model_dir, version, batch options}).
A deploy config whose only change is one expert's user_config (`mome serve RUN_DIR --deploy-config F`
after a re-distil: the version is the weights' sha256) makes Serve reconfigure that expert in place: no
replica restarts, requests in flight finish on the model they started with, nothing is dropped.
(Changing the app's `args`, or `serve.run` from Python, replaces every replica instead.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from fastapi import HTTPException
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from mome_ray.jeet import COMMON
from mome_ray.moe import sample_next
from mome_ray.router.store import INFO as ROUTER_INFO
from mome_ray.errors import MomeError
from mome_ray.storage import RunStore
from mome_ray.serving import (TEACHER, TOKEN_ENV, GenRequest, ServeConfig, ServedLM, ServeSpec, check_artifact,
                               load_spec, read_token)
from mome_ray.training import process_device
from serve.api import (CompletionRequest, ExpertInfo, ExpertsResponse, GenerateRequest, GenerateResponse, ModelCard,
                       ModelList, Route, RouteRequest, RouteResponse, ScoreRequest, ScoreResponse, Select)
from serve.http import http_app
from serve.streams import Generation, choice, choice_stream, merged, sse, usage

ROUTED = "mome"  # the OpenAI model id of the routed MoE; an expert's name forces that expert
VARIANT = "ple"  # the MoE variant served (its experts as separate LMs)

def replica_setup(threads: int) -> None:
    """torch threads = the replica's CPUs; no progress bars or INFO lines from transformers."""
    import transformers

    torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


@serve.deployment
class Expert:
    """One causal LM (a language expert, the common expert or the teacher): batched score and generate.

    The batch queues belong to the instance (`serve.batch` over bound methods): a queue on the class would
    be shared by every expert living in one process (Serve's local testing mode) and mix their requests.
    """

    def __init__(self, name: str, threads: int):
        replica_setup(threads)
        self.name, self.lm, self.source = name, None, None
        batch = serve.batch(max_batch_size=1)  # sizes from the user_config, in reconfigure
        self._score, self._next = batch(self._score_rows), batch(self._next_rows)
        self._generate = batch(self._generate_rows)

    def reconfigure(self, config: dict) -> None:
        """Load artifact `config["stage"]` of run `config["run"]` (fetched to this replica's node) unless this
        version is already loaded; then swap (a hot update). Serve calls it right after `__init__` with the
        deployment's user_config: the only place a model loads, so a replica started after a hot update loads
        the new version once (not the one it was first bound with, then the new one)."""
        for queue in (self._score, self._next, self._generate):
            queue.set_max_batch_size(config["max_batch_size"])
            queue.set_batch_wait_timeout_s(config["batch_wait_timeout_s"])
        source = (config["run"], config["stage"])
        if self.lm is None or self.lm.version != config["version"] or self.source != source:
            # on the replica's GPU when it has one; requests already running keep the model they hold
            self.lm = ServedLM(RunStore(config["run"]).fetch(config["stage"]), process_device())
            self.source = source

    async def check_health(self) -> None:
        """Serve's periodic health check: a replica whose model cannot run a 2-token forward is replaced."""
        if self.lm is None:
            raise RuntimeError(f"expert {self.name}: no model loaded (its reconfigure never succeeded)")
        await asyncio.to_thread(self.lm.score, [[0, 0]])

    def info(self) -> dict:
        return {"name": self.name, **self.lm.info()}

    async def score(self, ids: list[int]) -> list[float]:
        return await self._score(ids)

    async def next_logprobs(self, ids: list[int]) -> torch.Tensor:
        return await self._next(ids)

    async def generate(self, req: GenRequest) -> AsyncIterator[int]:
        """Streams the request's new token ids."""
        async for token in self._generate(req):
            yield token

    async def _score_rows(self, rows: list[list[int]]) -> list[list[float]]:
        return await asyncio.to_thread(self.lm.score, rows)

    async def _next_rows(self, rows: list[list[int]]) -> list[torch.Tensor]:
        return list(await asyncio.to_thread(self.lm.next_logprobs, rows))

    async def _generate_rows(self, reqs: list[GenRequest]) -> AsyncIterator[list]:
        """Per step, each request's next token id (StopIteration ends that request's stream)."""
        lm = self.lm  # the whole batch runs on one version, whatever reconfigure does meanwhile
        steps = lm.generate(reqs)
        while (out := await asyncio.to_thread(next, steps, None)) is not None:
            yield [StopIteration if t is None else t for t in out]


@serve.deployment
@serve.ingress()
class Gateway:
    """The ingress: validates, routes each prompt (batched), calls the experts' handles, answers.

    The HTTP routes (serve/http.py) call these methods; so can a handle (Serve's local testing mode).
    A client mistake raises HTTPException(4xx) with a message that says what was wrong.
    """

    def __init__(self, experts: dict[str, DeploymentHandle], spec: dict):
        from mome_ray.config import from_dict
        from mome_ray.serving import ServeLimits
        from mome_ray.tokenizer import load_tokenizer

        # Not `torch.` here: cloudpickle pickles this class by value (it is wrapped by @serve.ingress) and
        # takes `.classes` below for a use of the module `torch.classes`, which does not pickle.
        replica_setup(1)
        self.handles, self.langs, self.kinds = experts, spec["langs"], spec["kinds"]
        self.n_positions, self.limits = spec["n_positions"], from_dict(ServeLimits, spec["limits"])
        store = RunStore(spec["run"])
        self.tok = load_tokenizer(store.fetch(spec["tokenizer"]))  # this replica's node's copies
        self.eos = self.tok.eos_token_id
        self.router, self.router_info = None, {"classes": [], "version": None}
        if spec["router"]:
            from mome_ray.router import load_router

            self.router = load_router(store.fetch(spec["router"]))
            missing = [l for l in self.langs if l not in self.router.classes]
            if missing:
                raise MomeError(f"the router has no class for expert(s) {missing}; retrain it on every language")
            self.router_info = {"classes": self.router.classes, "unknown_below": self.router.unknown_below,
                                "version": spec["router_version"]}
        self._route_batch = serve.batch(max_batch_size=spec["router_batch"], batch_wait_timeout_s=0.002)(self._route_rows)
        self.variant, self.created = spec["variant"], int(time.time())
        self.token = read_token(spec["token_env"], spec["token_file"])  # this replica's own environment
        if spec["require_token"] and not self.token:
            where = f"the file serve.token_file '{spec['token_file']}'" if spec["token_file"] else \
                f"${spec['token_env'] or TOKEN_ENV} (serve.token_env)"
            raise MomeError(f"the HTTP proxy is not on loopback and this ingress replica has no bearer token: put it "
                            f"in {where} on every node that runs the ingress (or in the router deployment's "
                            f"runtime_env), or bind 127.0.0.1")

    def __serve_build_asgi_app__(self):
        """The FastAPI app, built in the replica (nothing of it is pickled)."""
        return http_app(self, self.token, self.limits.max_body_bytes)

    # --- endpoints

    async def healthz(self) -> dict:
        """Liveness: this replica answers. Costs nothing (no RPC), so it needs no token."""
        return {"status": "ok"}

    async def readyz(self) -> dict:
        """Readiness: every expert answers within 10 s (one RPC each, hence behind the token)."""
        try:
            await asyncio.wait_for(asyncio.gather(*[h.info.remote() for h in self.handles.values()]), 10)
        except Exception as e:  # an expert is down or restarting: not ready (a server state, not a client error)
            raise HTTPException(503, f"an expert is not answering: {type(e).__name__}") from None
        return {"status": "ready", "experts": list(self.handles)}

    async def models(self) -> ModelList:
        """OpenAI's model list: "mome" (routed) and each expert (forced), from what this replica knows."""
        cards = [ModelCard(id=ROUTED, created=self.created, kind="moe", variant=self.variant)]
        cards += [ModelCard(id=n, created=self.created, kind=self.kinds[n]) for n in self.handles]
        return ModelList(data=cards)

    async def model(self, name: str) -> ModelCard:
        card = next((c for c in (await self.models()).data if c.id == name), None)
        if card is None:
            raise HTTPException(404, f"no model '{name}': this app serves {[ROUTED, *self.handles]}")
        return card

    async def experts(self) -> ExpertsResponse:
        infos = await asyncio.gather(*[h.info.remote() for h in self.handles.values()])
        return ExpertsResponse(experts=[ExpertInfo(kind=self.kinds[i["name"]], **i) for i in infos],
                               router=self.router_info)

    async def route(self, body: RouteRequest) -> RouteResponse:
        texts = self._batch([body.prompt] if isinstance(body.prompt, str) else body.prompt)
        self._need_router()
        return RouteResponse(results=list(await asyncio.gather(*[self._route_batch(t) for t in texts])))

    async def score(self, body: ScoreRequest) -> ScoreResponse:
        ids = self._encode(body.prompt)
        experts, weights, route = await self._select(body, body.prompt)
        self._check_fits(experts, len(ids), 0)
        rows = await asyncio.gather(*[self.handles[e].score.remote(ids) for e in experts])
        logp = torch.logsumexp(torch.tensor(rows) + torch.tensor(weights).log()[:, None], 0)  # mix probabilities
        return ScoreResponse(experts=experts, weights=weights, route=route,
                             tokens=[self.tok.decode([i]) for i in ids[1:]], logprobs=logp.tolist(),
                             perplexity=math.exp(-logp.mean().item()))

    async def generate(self, body: GenerateRequest):
        plan = await self._plan(body, body.prompt, body.max_new_tokens)
        run = self._launch(plan, body.max_new_tokens, body.temperature, body.top_p, body.seed)
        if body.stream:
            return sse(self._generate_events(run))
        text, n, reason = await run.collect()
        return GenerateResponse(experts=run.experts, weights=run.weights, route=run.route, text=text,
                                prompt_tokens=run.prompt_tokens, completion_tokens=n, finish_reason=reason)

    async def completions(self, body: CompletionRequest):
        """OpenAI-compatible completions: one choice per prompt (`model`: "mome" routes, an expert name forces it).
        Every prompt is checked and routed before any generation starts: a mistake in one costs nothing."""
        select = Select() if body.model == ROUTED else Select(expert=body.model)
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        texts = self._batch(body.texts)
        plans = await asyncio.gather(*[self._plan(select, t, body.max_tokens, "max_tokens") for t in texts])
        runs = [self._launch(p, body.max_tokens, body.temperature, body.top_p, seed) for p in plans]
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": body.model}
        if body.stream:
            return sse(self._completion_events(runs, head, body.stream_options and body.stream_options.include_usage))
        done = await asyncio.gather(*[r.collect() for r in runs])
        return {**head, "choices": [choice(i, text, reason) for i, (text, _, reason) in enumerate(done)],
                "usage": usage(runs)}

    # --- routing

    async def _route_rows(self, texts: list[str]) -> list[Route]:
        classes, probs = await asyncio.to_thread(self.router.predict_proba, texts)
        routes = []
        for label, row in zip(self.router.decide(probs), probs):  # a class the MoE has no expert for: unknown
            sure = label in self.langs
            language = label if sure else "unknown"
            expert = language if sure else (COMMON if COMMON in self.handles else self._best(classes, row))
            routes.append(Route(language=language, expert=expert,
                                probabilities={c: round(float(p), 6) for c, p in zip(classes, row)}))
        return routes

    def _best(self, classes: list[str], row) -> str:
        return max(self.langs, key=lambda l: row[classes.index(l)])

    async def _select(self, body: Select, text: str) -> tuple[list[str], list[float], Route | None]:
        """(experts, weights, route): a forced expert, the routed one, or the top-k mixed."""
        if body.expert is not None:
            if body.expert not in self.handles:
                raise HTTPException(422, f"expert: no expert '{body.expert}'; this app serves {list(self.handles)}")
            return [body.expert], [1.0], None
        self._need_router()
        route = await self._route_batch(text)
        if body.top_k is None or route.language == "unknown":
            return [route.expert], [1.0], route
        if body.top_k > len(self.langs):
            raise HTTPException(422, f"top_k: at most {len(self.langs)} (the language experts), got {body.top_k}")
        top = sorted(self.langs, key=lambda l: -route.probabilities.get(l, 0.0))[: body.top_k]
        mass = sum(route.probabilities[l] for l in top)
        return top, [route.probabilities[l] / mass for l in top], route

    def _need_router(self) -> None:
        if self.router is None:
            raise HTTPException(422, "this MoE has no router artifact: force an expert with 'expert' "
                                     f"(one of {list(self.handles)}) or train one with `mome router`")

    # --- tokens and limits

    def _batch(self, texts: list[str]) -> list[str]:
        if not 1 <= len(texts) <= self.limits.max_batch:
            raise HTTPException(422, f"prompt: give 1 to {self.limits.max_batch} texts (serve.limits.max_batch), "
                                     f"got {len(texts)}")
        for t in texts:
            self._check_chars(t)
        return texts

    def _check_chars(self, text: str) -> None:
        if len(text) > self.limits.max_prompt_chars:
            raise HTTPException(422, f"prompt: {len(text):,} characters is over the limit of "
                                     f"{self.limits.max_prompt_chars:,} (serve.limits.max_prompt_chars)")

    def _encode(self, text: str) -> list[int]:
        """[eos] + the prompt's tokens: a document starts after eos, as in training."""
        self._check_chars(text)
        ids = [self.eos] + self.tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
        if len(ids) - 1 > self.limits.max_prompt_tokens:
            raise HTTPException(422, f"prompt: {len(ids) - 1} tokens is over the limit of "
                                     f"{self.limits.max_prompt_tokens} (serve.limits.max_prompt_tokens)")
        return ids

    def _check_fits(self, experts: list[str], prompt: int, new: int) -> None:
        context = min(self.n_positions[e] for e in experts)
        if prompt + new > context:
            what = f"a prompt of {prompt - 1} tokens" + (f" + max_new_tokens {new}" if new else "")
            raise HTTPException(422, f"{what} does not fit the context of expert(s) {experts}: {context} tokens "
                                     f"including one start token; shorten the prompt" + (" or ask for fewer "
                                     "tokens" if new else ""))

    # --- generation

    async def _plan(self, select: Select, text: str, max_new: int, field: str = "max_new_tokens") -> tuple:
        """(prompt ids, experts, weights, route) of one generation, every bound checked: nothing has started."""
        if max_new > self.limits.max_new_tokens:
            raise HTTPException(422, f"{field}: {max_new} is over the limit of {self.limits.max_new_tokens} "
                                     f"(serve.limits.max_new_tokens)")
        ids = self._encode(text)
        experts, weights, route = await self._select(select, text)
        self._check_fits(experts, len(ids), max_new)
        return ids, experts, weights, route

    def _launch(self, plan, max_new: int, temperature: float, top_p: float, seed: int) -> Generation:
        ids, experts, weights, route = plan
        req = GenRequest(ids, max_new, temperature, top_p, seed)
        if len(experts) == 1:
            tokens = self.handles[experts[0]].options(stream=True).generate.remote(req)
        else:
            tokens = self._mixed_tokens(experts, weights, req)
        return Generation(experts, weights, route, len(ids) - 1, tokens, self.tok, self.eos)

    async def _mixed_tokens(self, experts: list[str], weights: list[float], req: GenRequest) -> AsyncIterator[int]:
        """Top-k mixing: each step, the experts' next-token distributions weighted by the router, sampled here."""
        gen, ids, logw = torch.Generator().manual_seed(req.seed), list(req.ids), torch.tensor(weights).log()
        for _ in range(req.max_new_tokens):
            dists = await asyncio.gather(*[self.handles[e].next_logprobs.remote(ids) for e in experts])
            mixed = torch.logsumexp(torch.stack(dists) + logw[:, None], 0)
            tok = int(sample_next(mixed[None], req.temperature, req.top_p, gen)[0])
            ids.append(tok)
            yield tok
            if tok == self.eos:
                return

    async def _generate_events(self, run: Generation) -> AsyncIterator[dict]:
        yield {"experts": run.experts, "weights": run.weights, "route": run.route.model_dump() if run.route else None}
        async for delta in run.deltas():
            yield {"text": delta}
        yield {"finish_reason": run.finish_reason, "completion_tokens": run.n, "prompt_tokens": run.prompt_tokens}

    async def _completion_events(self, runs: list[Generation], head: dict, include_usage: bool) -> AsyncIterator[dict]:
        """OpenAI's chunks: each choice's text pieces as they come (choices interleave), then its finish_reason;
        with stream_options.include_usage, `usage: null` on each and a last chunk with the counts, no choices."""
        extra = {"usage": None} if include_usage else {}
        async for c in merged([choice_stream(i, run) for i, run in enumerate(runs)]):
            yield {**head, "choices": [c], **extra}
        if include_usage:
            yield {**head, "choices": [], "usage": usage(runs)}


# --- the application builder


class AppArgs(BaseModel):
    """`build_app` arguments (`serve run serve.app:build_app run_dir=...` or serve/config.yaml `args:`)."""

    run_dir: str = Field(description="the run directory (holds moe/ple.json, experts/, router/, tokenizer/)")
    config: str = Field("", description="a preset YAML whose `serve:` section configures the app")
    overrides: list[str] = Field(default_factory=list, description="config overrides, e.g. serve.teacher=false")
    models: dict[str, str] = Field(default_factory=dict, description="serve another model dir for an expert")
    require_token: bool = Field(False, description="the ingress refuses to start without a bearer token (set when "
                                                   "the HTTP proxy binds off loopback)")


def resolve(args: AppArgs) -> tuple[ServeConfig, ServeSpec, dict[str, dict]]:
    """The app's config, the served run, and each expert's user_config: its artifact (run + stage, fetched by
    the replica on its own node), the weights' sha256 (a new version swaps the expert in place:
    `Expert.reconfigure`) and its batching options."""
    from mome_ray.settings import load_settings

    cfg: ServeConfig = load_settings(args.config or None, args.overrides).serve
    spec = load_spec(args.run_dir, cfg.artifact, cfg.teacher)
    unknown = sorted(set(args.models) - set(spec.backends))
    if unknown:
        raise MomeError(f"models: no expert {unknown} in this run; experts: {list(spec.backends)}")
    experts = {}
    for name, stage in spec.backends.items():
        run = spec.run
        if name in args.models:  # another model folder (a path or URI): its parent is the "run"
            location = args.models[name].rstrip("/")
            run, stage = (location.rsplit("/", 1) if "://" in location else
                          (str(Path(location).absolute().parent), Path(location).name))
        opts = cfg.expert_args(name)
        experts[name] = {"run": run, "stage": stage, "version": check_artifact(RunStore(run), name, stage),
                         "max_batch_size": opts.max_batch_size, "batch_wait_timeout_s": opts.batch_wait_timeout_s}
    return cfg, spec, experts


def build_app(args: AppArgs | dict) -> serve.Application:
    """The router ingress bound to one expert deployment per backend of the run's MoE artifact."""
    # Serve passes a dict here: it reads the annotation, a string under `from __future__ import annotations`.
    args = args if isinstance(args, AppArgs) else AppArgs(**args)
    cfg, spec, experts = resolve(args)
    handles = {}
    for name, user_config in experts.items():
        opts = cfg.expert_args(name)
        handles[name] = Expert.options(**opts.options(f"expert-{name}", cfg.access_log), user_config=user_config).bind(
            name, max(1, round(opts.num_cpus)))
    kinds = {n: "teacher" if n == TEACHER else "common" if n == COMMON else "language" for n in experts}
    store = RunStore(spec.run)
    router_version = None
    if spec.router and (info := store.read_bytes(f"{spec.router}/{ROUTER_INFO}")):
        router_version = json.loads(info).get("sha256", "")[:12] or None  # the sha256 its loader checks it by
    gateway = {"run": spec.run, "langs": spec.langs, "kinds": kinds, "tokenizer": spec.tokenizer,
               "router": spec.router, "router_version": router_version,
               "router_batch": cfg.router.max_batch_size, "variant": VARIANT, "token_env": cfg.token_env,
               "token_file": cfg.token_file, "require_token": args.require_token,
               "limits": dataclasses.asdict(cfg.limits),
               "n_positions": {n: json.loads(RunStore(u["run"]).read_bytes(f"{u['stage']}/config.json"))["n_positions"]
                               for n, u in experts.items()}}
    return Gateway.options(**cfg.router.options("router", cfg.access_log)).bind(handles, gateway)
