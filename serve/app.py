"""The Ray Serve application: a router ingress (FastAPI) composed with the MoE and the teacher.

    mome serve runs/small                                   # local, 127.0.0.1:8000
    serve run serve.app:build_app run_dir=runs/small        # the same with Serve's CLI
    mome serve runs/small --deploy-config my.yaml           # the config `serve deploy my.yaml` runs on a cluster

Deployments (serve/models.py): `router` (the ingress: tokenizer + router, the HTTP API), `moe` (the MoE
variant `serve.model` names: PLE, JEET or MoE-CE, every expert loaded once per replica) and `teacher` (the
baseline). With `serve.multiplex: N` (PLE), the experts are served by `experts` instead, a multiplexed pool
that loads any number of them, at most N per replica, plus `expert-<name>` for each expert in `serve.hot`.
The ingress routes each text (`moe.decide`, batched across requests) and hands the decision to `moe`, which
runs the same `moe.MoE` as the evaluation grid: the unknown rule, forcing, top-k mixing and generation are
`moe.py`'s, so what is served is what was evaluated (the pool runs the expert routed top-1 would: `fallback`).
The ingress awaits its handles; it never blocks on them. Scores are batched across concurrent requests
(`@serve.batch`), generations continuously (decoding.py).

A model loads in `reconfigure` from its deployment's `user_config` ({artifacts, versions, batch options}).
A deploy config whose only change is a user_config (`mome serve RUN_DIR --deploy-config F` after a
re-distil: versions are the weights' sha256) makes Serve reconfigure that deployment in place: no replica
restarts, requests in flight finish on the model they started with, nothing is dropped. (Changing the
app's `args`, or `serve.run` from Python, replaces every replica instead.)
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

from fastapi import HTTPException
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from mome_ray.errors import MomeError
from mome_ray.jeet import COMMON
from mome_ray.moe import UNKNOWN, decide, fallback
from mome_ray.router.store import INFO as ROUTER_INFO
from mome_ray.decoding import GenRequest
from mome_ray.serving import (TEACHER, TOKEN_ENV, VARIANTS, ServeConfig, ServeSpec, check_artifact, load_spec,
                               model_config, read_token)
from mome_ray.storage import RunStore
from serve.api import (CompletionRequest, ExpertInfo, ExpertsResponse, GenerateRequest, GenerateResponse, ModelCard,
                       ModelList, Route, RouteRequest, RouteResponse, ScoreRequest, ScoreResponse, Select)
from serve.http import http_app
from serve.models import ExpertPool, MoEServer, replica_setup
from serve.streams import Generation, choice, choice_stream, merged, sse, usage

ROUTED = "mome"  # the OpenAI model id of the routed MoE; an expert's name forces that expert
MOE = "moe"  # the MoE's deployment (and handle) name
POOL = "experts"  # the multiplexed expert pool's (serve.multiplex)
HOT = "expert-"  # + an expert's name: a hot expert's own deployment (serve.hot)


@serve.deployment
@serve.ingress()
class Gateway:
    """The ingress: validates, routes each prompt (batched), hands that to the MoE or the teacher, answers.

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
        self.handles, self.langs, self.members = experts, spec["langs"], spec["members"]
        self.model_ids, self.hot = spec["model_ids"], spec["hot"]  # the pool's experts' model ids; hot experts
        self.pooled = {n: experts[POOL].options(multiplexed_model_id=m) for n, m in self.model_ids.items()}  # handles
        self.has_common = COMMON in self.members
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
        self._route_batch = serve.batch(max_batch_size=spec["router_batch"],
                                        batch_wait_timeout_s=spec["router_wait_s"])(self._route_rows)
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
        """Readiness: the MoE and the teacher answer within 10 s (one RPC each, hence behind the token)."""
        try:
            await asyncio.wait_for(asyncio.gather(*[h.info.remote() for h in self.handles.values()]), 10)
        except Exception as e:  # a deployment is down or restarting: not ready (a server state, not a client error)
            raise HTTPException(503, f"a deployment is not answering: {type(e).__name__}") from None
        return {"status": "ready", "experts": self.servable}

    @property
    def servable(self) -> list[str]:
        """What `expert` / an OpenAI `model` may name: the MoE's members, then the teacher if served."""
        return self.members + ([TEACHER] if TEACHER in self.handles else [])

    async def models(self) -> ModelList:
        """OpenAI's model list: "mome" (routed) and each expert (forced), from what this replica knows."""
        cards = [ModelCard(id=ROUTED, created=self.created, kind="moe", variant=self.variant)]
        cards += [ModelCard(id=n, created=self.created, kind=self._kind(n)) for n in self.servable]
        return ModelList(data=cards)

    async def model(self, name: str) -> ModelCard:
        card = next((c for c in (await self.models()).data if c.id == name), None)
        if card is None:
            raise HTTPException(404, f"no model '{name}': this app serves {[ROUTED, *self.servable]}")
        return card

    async def experts(self) -> ExpertsResponse:
        infos = await asyncio.gather(*[h.info.remote() for h in self.handles.values()])
        return ExpertsResponse(variant=self.variant, experts=[ExpertInfo(**e) for i in infos for e in i["experts"]],
                               router=self.router_info)

    def _kind(self, name: str) -> str:
        return TEACHER if name == TEACHER else COMMON if name == COMMON else "language"

    async def route(self, body: RouteRequest) -> RouteResponse:
        texts = self._batch([body.prompt] if isinstance(body.prompt, str) else body.prompt)
        self._need_router()
        return RouteResponse(results=[r for r, _ in await asyncio.gather(*[self._route_batch(t) for t in texts])])

    async def score(self, body: ScoreRequest) -> ScoreResponse:
        ids = self._encode(body.prompt)
        target, select, route = await self._select(body, body.prompt)
        self._check_fits(target, len(ids), 0)
        out = await self._handle(target, select).score.remote(ids, select)
        logp = out["logprobs"]
        return ScoreResponse(experts=list(out["selected"]), weights=list(out["selected"].values()), route=route,
                             tokens=[self.tok.decode([i]) for i in ids[1:]], logprobs=logp,
                             perplexity=math.exp(-sum(logp) / len(logp)))

    async def generate(self, body: GenerateRequest):
        plan = await self._plan(body, body.prompt, body.max_new_tokens)
        run = await self._launch(plan, body.max_new_tokens, body.temperature, body.top_p, body.seed, body.stream)
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
        runs = await asyncio.gather(*[self._launch(p, body.max_tokens, body.temperature, body.top_p, seed, body.stream)
                                      for p in plans])
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": body.model}
        if body.stream:
            return sse(self._completion_events(runs, head, body.stream_options and body.stream_options.include_usage))
        done = await asyncio.gather(*[r.collect() for r in runs])
        return {**head, "choices": [choice(i, text, reason) for i, (text, _, reason) in enumerate(done)],
                "usage": usage(runs)}

    # --- routing: the router's answer as a `moe.Routing`, which the MoE deployment applies

    async def _route_rows(self, texts: list[str]) -> list[tuple[Route, dict]]:
        classes, probs = await asyncio.to_thread(self.router.predict_proba, texts)
        routing = decide(classes, probs, self.langs, self.router.unknown_below)  # not an expert's class: unknown
        goes = fallback(routing, len(self.langs), self.has_common)  # what the MoE does with it routed top-1
        out = []
        for i, row in enumerate(probs):
            index = int(routing.index[i])
            route = Route(language=self.langs[index] if index != UNKNOWN else "unknown",
                          expert=self.members[int(goes[i])],
                          probabilities={c: round(float(p), 6) for c, p in zip(classes, row)})
            out.append((route, {"index": index, "probs": routing.probs[i].tolist()}))
        return out

    async def _select(self, body: Select, text: str) -> tuple[str, dict, Route | None]:
        """(deployment, the MoE's select, route): the teacher, a forced expert, routed top-1 or the top-k mixed."""
        if body.expert is not None:
            if body.expert not in self.servable:
                raise HTTPException(422, f"expert: no expert '{body.expert}'; this app serves {self.servable}")
            return self._target(body.expert), {"force": body.expert}, None
        self._need_router()
        if body.top_k is not None and body.top_k > len(self.langs):
            raise HTTPException(422, f"top_k: at most {len(self.langs)} (the language experts), got {body.top_k}")
        if body.top_k is not None and MOE not in self.handles:
            raise HTTPException(422, "top_k: this app serves its experts one per request (serve.multiplex); mixing "
                                     "needs them in one replica (serve.multiplex=0): route top-1 or force an expert")
        route, routing = await self._route_batch(text)
        if MOE not in self.handles:  # the expert routed top-1 runs (`fallback` placed an unknown text)
            return self._target(route.expert), {"force": route.expert}, route
        mode = {"mode": "topk", "k": body.top_k} if body.top_k is not None else {}
        return MOE, {"routing": routing, **mode}, route

    def _target(self, name: str) -> str:
        """The deployment that serves a member: the teacher's, a hot expert's, the pool or the MoE."""
        return TEACHER if name == TEACHER else HOT + name if name in self.hot else POOL if name in self.pooled else MOE

    def _handle(self, target: str, select: dict) -> DeploymentHandle:
        return self.pooled[select["force"]] if target == POOL else self.handles[target]

    def _need_router(self) -> None:
        if self.router is None:
            raise HTTPException(422, "this MoE has no router artifact: force an expert with 'expert' "
                                     f"(one of {self.servable}) or train one with `mome router`")

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

    def _check_fits(self, target: str, prompt: int, new: int) -> None:
        target = TEACHER if target == TEACHER else "MoE"  # the MoE's context: its shortest expert's
        context = self.n_positions[target]
        if prompt + new > context:
            what = f"a prompt of {prompt - 1} tokens" + (f" + max_new_tokens {new}" if new else "")
            raise HTTPException(422, f"{what} does not fit the context of the {target}: {context} tokens "
                                     f"including one start token; shorten the prompt" + (" or ask for fewer "
                                     "tokens" if new else ""))

    # --- generation

    async def _plan(self, select: Select, text: str, max_new: int, field: str = "max_new_tokens") -> tuple:
        """(prompt ids, deployment, select, route) of one generation, every bound checked: nothing has started."""
        if max_new > self.limits.max_new_tokens:
            raise HTTPException(422, f"{field}: {max_new} is over the limit of {self.limits.max_new_tokens} "
                                     f"(serve.limits.max_new_tokens)")
        ids = self._encode(text)
        target, moe_select, route = await self._select(select, text)
        self._check_fits(target, len(ids), max_new)
        return ids, target, moe_select, route

    async def _launch(self, plan, max_new: int, temperature: float, top_p: float, seed: int,
                      stream: bool) -> Generation:
        """Start one generation. Streamed: the deployment streams the selection, then a token per item;
        otherwise one call answers the whole of it (a streamed item per token costs ~1 ms each way)."""
        ids, target, select, route = plan
        req = GenRequest(ids, max_new, temperature, top_p, seed, self.eos)
        handle = self._handle(target, select)
        if stream:
            tokens = handle.options(stream=True).generate.remote(req, select)
            selected = (await tokens.__anext__())["selected"]
        else:
            done = await handle.complete.remote(req, select)
            selected, tokens = done["selected"], _items(done["tokens"])
        return Generation(list(selected), list(selected.values()), route, len(ids) - 1, tokens, self.tok, self.eos)

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


async def _items(xs: list) -> AsyncIterator:
    for x in xs:
        yield x


# --- the application builder


class AppArgs(BaseModel):
    """`build_app` arguments (`serve run serve.app:build_app run_dir=...` or serve/config.yaml `args:`)."""

    run_dir: str = Field(description="the run directory (holds moe/, experts/, router/, tokenizer/)")
    config: str = Field("", description="a preset YAML whose `serve:` section configures the app")
    overrides: list[str] = Field(default_factory=list, description="config overrides, e.g. serve.teacher=false")
    models: dict[str, str] = Field(default_factory=dict, description="serve another model dir for a part (a PLE "
                                   "expert, the JEET / MoE-CE model, the teacher)")
    require_token: bool = Field(False, description="the ingress refuses to start without a bearer token (set when "
                                                   "the HTTP proxy binds off loopback)")


def resolve(args: AppArgs) -> tuple[ServeConfig, ServeSpec, dict[str, dict]]:
    """The app's config, the served run, and each model deployment's user_config: its artifacts (run + stage,
    fetched by each replica on its own node), the weights' sha256 per part (a new version swaps the model in
    place: `reconfigure`) and its batching options."""
    from mome_ray.settings import load_settings

    cfg: ServeConfig = load_settings(args.config or None, args.overrides).serve
    spec = load_spec(args.run_dir, cfg.artifact, cfg.teacher, cfg.model)
    parts = {**spec.parts, **({TEACHER: spec.teacher} if spec.teacher else {})}
    unknown = sorted(set(args.models) - set(parts))
    if unknown:
        raise MomeError(f"models: no part {unknown} in the served {VARIANTS[spec.variant]}; parts: {list(parts)}")
    located = {}
    for name, stage in parts.items():
        run = spec.run
        if name in args.models:  # another model folder (a path or URI): its parent is the "run"
            location = args.models[name].rstrip("/")
            run, stage = (location.rsplit("/", 1) if "://" in location else
                          (str(Path(location).absolute().parent), Path(location).name))
        version = check_artifact(RunStore(run), name, stage) if name in args.models else spec.versions[name]
        located[name] = {"run": run, "stage": stage, "version": version}
    def user_config(variant: str, names: list[str], opts) -> dict:
        return {"variant": variant, "parts": {n: {"run": located[n]["run"], "stage": located[n]["stage"]} for n in names},
                "versions": {n: located[n]["version"] for n in names}, "max_batch_size": opts.max_batch_size,
                "batch_wait_timeout_s": opts.batch_wait_timeout_s, "batching": cfg.batching}

    members = [n for n in located if n != TEACHER]
    if not cfg.multiplex:
        if cfg.hot:
            raise MomeError(f"serve.hot {cfg.hot}: hot experts get deployments of their own beside the multiplexed "
                            f"pool; set serve.multiplex (experts per pool replica) or leave serve.hot empty")
        configs = {MOE: user_config(spec.variant, members, cfg.moe)}
    else:
        if spec.variant != "ple":
            raise MomeError(f"serve.multiplex serves PLE experts (whole models, one per request); "
                            f"{VARIANTS[spec.variant]} shares its parts in one model: set serve.model=ple, or "
                            f"serve.multiplex=0 to serve {VARIANTS[spec.variant]} in one deployment")
        if set(cfg.hot) - set(members):
            raise MomeError(f"serve.hot: no expert {sorted(set(cfg.hot) - set(members))}; experts: {members}")
        pooled = [n for n in members if n not in cfg.hot]
        configs = {HOT + n: user_config("ple", [n], cfg.moe) for n in cfg.hot}
        if pooled:
            configs[POOL] = {**user_config("ple", pooled, cfg.moe), "n_positions": spec.n_positions}
    if spec.teacher:
        configs[TEACHER] = user_config("ple", [TEACHER], cfg.baseline)  # the teacher: a one-model PLE
    return cfg, spec, configs


def router_mismatch(spec: ServeSpec) -> str:
    """What start-up says when the router knows languages the served MoE has no expert for (e.g. after
    `mome add-expert`, whose new MoE is another artifact): "" when they agree."""
    if not spec.router:
        return ""
    raw = RunStore(spec.run).read_bytes(f"{spec.router}/{ROUTER_INFO}")
    extra = [c for c in (json.loads(raw).get("classes", []) if raw else []) if c not in spec.langs and c != "unknown"]
    if not extra:
        return ""
    return (f"the router knows {extra} but the served MoE has no expert for them: such text is routed as unknown; "
            f"serve the MoE that has them (e.g. serve.artifact=moe_plus_{extra[0]} after `mome add-expert`)")


def build_app(args: AppArgs | dict) -> serve.Application:
    """The router ingress bound to the MoE deployment (and the teacher's)."""
    import logging

    # Serve passes a dict here: it reads the annotation, a string under `from __future__ import annotations`.
    args = args if isinstance(args, AppArgs) else AppArgs(**args)
    resolved = resolve(args)
    if warning := router_mismatch(resolved[1]):
        logging.getLogger("ray.serve").warning(warning)
    return app_of(args, *resolved)


def app_of(args: AppArgs, cfg: ServeConfig, spec: ServeSpec, configs: dict[str, dict]) -> serve.Application:
    """The app of what `resolve` found (`mome serve` resolves once, says what it serves, then builds)."""
    handles = {}
    for name, config in configs.items():
        opts = cfg.baseline if name == TEACHER else cfg.moe
        threads = max(1, round(opts.num_cpus))
        deployment = (ExpertPool.options(**opts.options(name, cfg.access_log), user_config=config).bind(
            threads, cfg.multiplex) if name == POOL else
            MoEServer.options(**opts.options(name, cfg.access_log), user_config=config).bind(threads))
        handles[name] = deployment
    store = RunStore(spec.run)
    router_version = None
    if spec.router and (info := store.read_bytes(f"{spec.router}/{ROUTER_INFO}")):
        router_version = json.loads(info).get("sha256", "")[:12] or None  # the sha256 its loader checks it by
    n_positions = {"MoE": spec.n_positions}
    if spec.teacher:
        t = configs[TEACHER]["parts"][TEACHER]
        n_positions[TEACHER] = model_config(RunStore(t["run"]), t["stage"])["n_positions"]
    gateway = {"run": spec.run, "langs": spec.langs, "members": spec.members, "tokenizer": spec.tokenizer,
               "router": spec.router, "router_version": router_version,
               "router_batch": cfg.router.max_batch_size, "router_wait_s": cfg.router.batch_wait_timeout_s,
               "variant": spec.variant, "token_env": cfg.token_env,
               "token_file": cfg.token_file, "require_token": args.require_token,
               "limits": dataclasses.asdict(cfg.limits), "n_positions": n_positions, "hot": list(cfg.hot),
               "model_ids": {n: f"{n}@{v}" for n, v in configs.get(POOL, {"versions": {}})["versions"].items()}}
    return Gateway.options(**cfg.router.options("router", cfg.access_log)).bind(handles, gateway)
