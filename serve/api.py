"""The HTTP API's request and response models (pydantic): types and hard bounds, shown at /docs.

Bounds that come from config (prompt length, max_new_tokens cap, batch size) are checked by the ingress
against `ServeLimits`; these models hold what is always true. An unknown field is an error on our own
endpoints; `/v1/completions` ignores the OpenAI fields it does not use, as OpenAI clients send several.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Prompt = Field(min_length=1, description="the text (at least one character)")


class Select(BaseModel):
    """Which expert answers: routed by default; or a named expert; or the top-k experts mixed."""

    model_config = ConfigDict(extra="forbid")
    expert: str | None = Field(None, description="force this expert: a language, 'common' or 'teacher'")
    top_k: int | None = Field(None, ge=1, le=16, description="mix the router's k most probable experts")

    @model_validator(mode="after")
    def _one_choice(self):
        if self.expert is not None and self.top_k is not None:
            raise ValueError("give either 'expert' or 'top_k', not both")
        return self


class RouteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str | list[str] = Field(description="a text, or a list of texts (at most serve.limits.max_batch)")


class Route(BaseModel):
    language: str  # a language code, or "unknown"
    expert: str  # where a routed request goes (unknown -> the common expert, else the most probable)
    probabilities: dict[str, float]


class RouteResponse(BaseModel):
    results: list[Route]


class ScoreRequest(Select):
    prompt: str = Prompt


class ScoreResponse(BaseModel):
    experts: list[str]  # the experts mixed (one when routed top-1 or forced), MoE-CE's common averaged in besides
    weights: list[float]
    route: Route | None  # the router's decision (None when an expert was forced)
    tokens: list[str]
    logprobs: list[float]  # log p(token t+1 | tokens <= t), one per token after the first
    perplexity: float


class GenerateRequest(Select):
    prompt: str = Prompt
    max_new_tokens: int = Field(32, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=10.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = Field(0, ge=0, le=2**63 - 1, description="the same seed gives the same text")
    stream: bool = Field(False, description="server-sent events, one per token")


class GenerateResponse(BaseModel):
    experts: list[str]
    weights: list[float]
    route: Route | None
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="end the stream with a chunk holding `usage` (no choices)")


class CompletionRequest(BaseModel):
    """The subset of OpenAI's POST /v1/completions we serve; `model` is "mome" (routed) or an expert name."""

    model_config = ConfigDict(extra="ignore")
    model: str = "mome"
    prompt: str | list[str] = Field(description="a text, or a list of texts: one choice each (at most "
                                                "serve.limits.max_batch)")
    max_tokens: int = Field(16, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="one completion per prompt")

    @model_validator(mode="after")
    def _texts(self):
        if not self.texts:
            raise ValueError("prompt: give at least one text")
        if not all(self.texts):
            raise ValueError("prompt: must not be empty")
        return self

    @property
    def texts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


class ExpertInfo(BaseModel):
    name: str
    kind: Literal["language", "common", "teacher"]
    version: str  # sha256 prefix of its model.safetensors
    params: int | None  # None: an expert of the multiplexed pool (serve.multiplex), loaded where it runs
    n_positions: int


class ExpertsResponse(BaseModel):
    variant: str  # the served MoE: ple | jeet | moe-ce (MoE-CE averages its common expert into every expert)
    experts: list[ExpertInfo]
    router: dict  # classes, unknown_below, version


class ModelCard(BaseModel):
    """One entry of GET /v1/models (OpenAI's model object): the routed MoE ("mome") or one of its experts."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mome-ray"
    kind: Literal["moe", "language", "common", "teacher"]
    variant: str | None = None  # the MoE's variant (ple | jeet | moe-ce) for "mome"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
