"""The model deployments of the Serve app: `MoEServer` (one MoE in every replica: the served variant, the
teacher, a hot expert) and `ExpertPool` (PLE experts multiplexed: any number, a few loaded per replica).

Both serve `ServedMoE`s: one loaded `moe.MoE` with its own score batch queue (`@serve.batch`: requests are
grouped by model) and its own decoder (`decoding.Decoder`: continuous batching). A request says how it selects
experts (`select`): {"routing": {"index", "probs"}} as the ingress's router decided, optionally with
{"mode": "topk", "k": k}, or {"force": expert}; `MoE` applies it exactly as the evaluation grid does.

A deployment's user_config (`app.resolve`) holds {variant, parts: {name: {run, stage}}, versions, batch
options}; models load from the run's storage, fetched to the replica's own node, in `reconfigure` (MoEServer)
or on a request's first use (ExpertPool). A new user_config swaps the model in place; requests in flight
finish on the one they started with.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import AsyncIterator

import torch
from ray import serve

from mome_ray.decoding import Decoder, GenRequest, Streams, pad_rows
from mome_ray.errors import MomeError
from mome_ray.jeet import COMMON
from mome_ray.moe import Routing
from mome_ray.serving import TEACHER, load_moe
from mome_ray.storage import RunStore
from mome_ray.training import process_device


def replica_setup(threads: int) -> None:
    """torch threads = the replica's CPUs; no progress bars or INFO lines from transformers."""
    import transformers

    torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


class ServedMoE:
    """One loaded MoE: batched scores and continuous-batched generation (`serve.batching`)."""

    def __init__(self, config: dict):
        dirs = {n: RunStore(p["run"]).fetch(p["stage"]) for n, p in config["parts"].items()}
        self.moe = load_moe(dirs, config["variant"], process_device())
        self.variant, self.device = config["variant"], next(self.moe.parameters()).device
        self.parts = [{"name": n, "kind": n if n in (COMMON, TEACHER) else "language",
                       "version": config["versions"].get(n) or next(iter(config["versions"].values())),
                       "params": self.moe.active_params(force=n), "n_positions": self.moe.experts.n_positions}
                      for n in self.moe.members]
        self._score = serve.batch(max_batch_size=1)(self._score_rows)  # the queue of this model's scores
        self.streams: Streams | None = None
        self.configure(config)

    def configure(self, config: dict) -> None:
        """Batch sizes from the user_config; a new decoder when its options change (generations running keep
        theirs)."""
        self._score.set_max_batch_size(config["max_batch_size"])
        self._score.set_batch_wait_timeout_s(config["batch_wait_timeout_s"])
        if self.streams is None or (self.streams.decoder.max_batch, self.streams.decoder.admit) != \
                (config["max_batch_size"], config["batching"]):
            self.streams = Streams(Decoder(self.moe, config["max_batch_size"], config["batching"]),
                                   config["batch_wait_timeout_s"] if config["batching"] == "static" else 0.0)

    async def check(self) -> None:
        """A 2-token forward: raises if the model cannot run."""
        ids = torch.zeros(1, 2, dtype=torch.long, device=self.device)
        await asyncio.to_thread(self.moe.score, ids, force=self.moe.members[0])

    async def score(self, ids: list[int], select: dict) -> dict:
        """{"logprobs": per next token, "selected": {member: weight}, "experts": the members that ran}."""
        return await self._score((ids, select))

    async def generate(self, req: GenRequest, select: dict) -> AsyncIterator:
        """{"selected": {member: weight}} first, then the new token ids: the request joins the running decode
        batch at its next step and leaves when done."""
        stream = self.streams.generate(req, **self._kwargs([select]))
        yield {"selected": await anext(stream)}
        async for token in stream:
            yield token

    async def complete(self, req: GenRequest, select: dict) -> dict:
        """The whole generation in one answer (no item per token, here or over the wire): {"selected", "tokens"}."""
        stream = self.streams.generate(req, stream=False, **self._kwargs([select]))
        selected = await anext(stream)
        return {"selected": selected, "tokens": [t async for t in stream]}

    async def _score_rows(self, items: list[tuple[list[int], dict]]) -> list[dict]:
        return await asyncio.to_thread(self._score_sync, items)

    def _score_sync(self, items: list[tuple[list[int], dict]]) -> list[dict]:
        out = [None] * len(items)
        groups: dict[str, list[int]] = {}  # requests that select alike run as one padded batch
        for i, (_, select) in enumerate(items):
            groups.setdefault(json.dumps({k: v for k, v in select.items() if k != "routing"}, sort_keys=True),
                              []).append(i)
        for rows in groups.values():
            ids, mask, _ = pad_rows([items[i][0] for i in rows])  # right padding: causal, so no row sees it
            with torch.inference_mode():
                scores = self.moe.score(ids.to(self.device), mask.to(self.device),
                                        **self._kwargs([items[i][1] for i in rows]))
            for j, i in enumerate(rows):
                out[i] = {"logprobs": scores.logprobs[j, : len(items[i][0]) - 1].tolist(),
                          "selected": scores.selected[j], "experts": list(scores.experts[j])}
        return out

    def _kwargs(self, selects: list[dict]) -> dict:
        """`MoE` keyword arguments for rows that select alike: their routings stacked into one `Routing`."""
        kwargs = {k: v for k, v in selects[0].items() if k != "routing"}
        if "routing" in selects[0]:
            kwargs["routing"] = Routing(torch.tensor([s["routing"]["index"] for s in selects], device=self.device),
                                        torch.tensor([s["routing"]["probs"] for s in selects], device=self.device))
        return kwargs


@serve.deployment
class MoEServer:
    """One MoE loaded once per replica, in `reconfigure`: the served variant (PLE, JEET or MoE-CE, deployment
    `moe`), the teacher (a one-model PLE, `teacher`) or a hot expert next to the pool (`expert-<name>`)."""

    def __init__(self, threads: int):
        replica_setup(threads)
        self.served: ServedMoE | None = None
        self.loaded = None

    def reconfigure(self, config: dict) -> None:
        """Load the parts (the run's artifacts, fetched to this node) unless these versions are loaded; then
        swap. The only place the model loads (Serve calls it right after `__init__`)."""
        loaded = json.dumps([config["variant"], config["parts"], config["versions"]], sort_keys=True)
        if loaded != self.loaded:
            self.served, self.loaded = ServedMoE(config), loaded
        else:
            self.served.configure(config)

    async def check_health(self) -> None:
        """Serve's periodic health check: a replica whose model cannot run a 2-token forward is replaced."""
        if self.served is None:
            raise RuntimeError("no model loaded (its reconfigure never succeeded)")
        await self.served.check()

    def info(self) -> dict:
        return {"variant": self.served.variant, "experts": self.served.parts}

    async def score(self, ids: list[int], select: dict) -> dict:
        return await self.served.score(ids, select)

    async def complete(self, req: GenRequest, select: dict) -> dict:
        return await self.served.complete(req, select)

    async def generate(self, req: GenRequest, select: dict) -> AsyncIterator:
        async for item in self.served.generate(req, select):  # keeps the model it started on
            yield item


@serve.deployment
class ExpertPool:
    """PLE experts multiplexed (`serve.multiplex`): the ingress sends each request with the model id
    "<expert>@<weights' sha256 prefix>" (Serve routes it to a replica that has it loaded when one has); a
    replica loads an expert on its first request and keeps at most `max_models`, evicting the least
    recently used. Each loaded expert batches its own scores and decodes its own batch."""

    def __init__(self, threads: int, max_models: int):
        replica_setup(threads)
        self.config: dict | None = None
        self.loaded: weakref.WeakValueDictionary[str, ServedMoE] = weakref.WeakValueDictionary()  # Serve's cache's

        async def load(model_id: str) -> ServedMoE:  # a function: Serve keeps its LRU cache on it
            return await asyncio.to_thread(self._load, model_id)

        self.model = serve.multiplexed(max_num_models_per_replica=max_models)(load)

    def reconfigure(self, config: dict) -> None:
        """The experts this pool serves and their versions; each loads on its first request (a new version is a
        new model id: the old one is evicted as least recently used). New batch options apply to the loaded
        experts too."""
        self.config = config
        for served in list(self.loaded.values()):
            served.configure(config)

    def _load(self, model_id: str) -> ServedMoE:
        """The expert's current version (an ingress replica not yet rolled after a hot update still asks for
        the old id: the name decides, the version keeps the two apart in the cache)."""
        name = model_id.rpartition("@")[0]
        if name not in self.config["parts"]:
            raise MomeError(f"no expert '{name}' in this pool; it serves {list(self.config['parts'])}")
        served = self.loaded[model_id] = ServedMoE({**self.config, "parts": {name: self.config["parts"][name]},
                                                    "versions": {name: self.config["versions"][name]}})
        return served

    async def check_health(self) -> None:
        if self.config is None:
            raise RuntimeError("no experts configured (its reconfigure never succeeded)")

    def info(self) -> dict:
        """Every expert of the pool (params: None, known once loaded where it runs)."""
        return {"variant": "ple", "experts": [{"name": n, "kind": COMMON if n == COMMON else "language",
                                               "version": v, "params": None, "n_positions": self.config["n_positions"]}
                                              for n, v in self.config["versions"].items()]}

    async def score(self, ids: list[int], select: dict) -> dict:
        return await (await self.model(serve.get_multiplexed_model_id())).score(ids, select)

    async def complete(self, req: GenRequest, select: dict) -> dict:
        return await (await self.model(serve.get_multiplexed_model_id())).complete(req, select)

    async def generate(self, req: GenRequest, select: dict) -> AsyncIterator:
        served = await self.model(serve.get_multiplexed_model_id())
        async for item in served.generate(req, select):
            yield item
