"""HTTP plumbing of the ingress: one error shape for every 4xx, a body-size limit and bearer-token auth.

Every POST body is read as JSON, whatever its Content-Type says (`curl -d '{...}'` sends form data's).

Every error answers `{"error": {"message": ..., "type": ..., "code": status}}` (OpenAI's shape), with a
message that says what was wrong: bad JSON, a field of the wrong type or out of its bounds, a missing
field, an unknown expert, a prompt too long, a body too large, a missing or wrong token.

`http_app(gateway, token, max_body_bytes)` builds the FastAPI app in the ingress replica (Serve's late-bound
ingress), each route a thin call into the `Gateway` method of the same name; `Guard` is plain ASGI
middleware in front of it.
"""

from __future__ import annotations

import hmac
import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError
from starlette.exceptions import HTTPException

from mome_ray.errors import MomeError
from serve.api import (CompletionRequest, ExpertsResponse, GenerateRequest, GenerateResponse, ModelCard, ModelList,
                       RouteRequest, RouteResponse, ScoreRequest, ScoreResponse)

# Never need the token: liveness costs nothing, the docs are static. /readyz (one RPC per expert) does.
OPEN_PATHS = ("/healthz", "/docs", "/openapi.json", "/redoc")
ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
               413: "request_too_large", 503: "service_unavailable"}


def error_body(status: int, message: str) -> dict:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "code": status}}


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status, headers=headers)


def describe_validation(errors: list[dict]) -> str:
    """Pydantic/FastAPI validation errors as one readable line: 'max_new_tokens: ... (got 9999)'."""
    parts = []
    for e in errors:
        if e.get("type") == "json_invalid":
            parts.append(f"the request body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})")
            continue
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        msg = e.get("msg", "invalid").removeprefix("Value error, ")
        got = f" (got {_shown(e['input'])})" if "input" in e and e.get("type") != "missing" else ""
        parts.append(f"{loc}: {msg}{got}")
    return "; ".join(parts)


def _shown(value) -> str:
    """A short JSON-ish rendering of an offending input (bytes as text), never an exception."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    try:
        return json.dumps(value)[:80]
    except (TypeError, ValueError):
        return repr(value)[:80]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error_response(422, describe_validation(exc.errors()))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RayActorError)
    async def _replica_down(request: Request, exc: RayActorError):  # not the client's fault: retry (503)
        return error_response(503, "an expert replica stopped during this request and is being replaced; "
                                   "retry in a moment", {"Retry-After": "1"})

    @app.exception_handler(MomeError)
    async def _mome(request: Request, exc: MomeError):  # a request the models cannot take
        return error_response(422, str(exc))


class BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: refuse bodies over `max_body_bytes` (413) and, when a token is set, /v1/* without it (401)."""

    def __init__(self, app, token: str = "", max_body_bytes: int = 1_000_000):
        self.app, self.token, self.max_body_bytes = app, token, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.token and not scope["path"].startswith(OPEN_PATHS) and not self._authorized(headers):
            return await error_response(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>' "
                                        "(the server reads it from serve.token_file or $MOME_SERVE_TOKEN)",
                                        {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        if scope["method"] == "POST" and headers.get(b"content-type", b"").split(b";")[0] != b"application/json":
            # Every POST body is JSON: read it as JSON whatever the client said (`curl -d` says form data).
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                     + [(b"content-type", b"application/json")]}
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._too_large(scope, receive, send)
        seen, started = 0, False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                raise BodyTooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            started |= message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            if not started:
                await self._too_large(scope, receive, send)

    def _authorized(self, headers: dict) -> bool:
        given = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, value = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token.encode())

    async def _too_large(self, scope, receive, send):
        await error_response(413, f"the request body is over the limit of {self.max_body_bytes:,} bytes "
                             f"(serve.limits.max_body_bytes)")(scope, receive, send)


def http_app(gw, token: str, max_body_bytes: int) -> FastAPI:
    """The HTTP API over a `serve.app.Gateway` (OpenAPI docs at /docs)."""
    app = FastAPI(title="mome-ray", version="0.1.0",
                  description="A mixture of modular language experts: a router sends each prompt to its "
                              "language's expert (arXiv 2407.19610).")
    app.add_middleware(Guard, token=token, max_body_bytes=max_body_bytes)
    install_error_handlers(app)

    @app.get("/healthz", description="Liveness: the ingress answers (no RPC, no token).")
    async def healthz() -> dict:
        return await gw.healthz()

    @app.get("/readyz", description="Readiness: every expert answers (one RPC each; needs the token when one is set).")
    async def readyz() -> dict:
        return await gw.readyz()

    @app.get("/v1/models", response_model=ModelList, description="OpenAI's model list: 'mome' (routed) and each expert.")
    async def models():
        return await gw.models()

    @app.get("/v1/models/{name}", response_model=ModelCard)
    async def model(name: str):
        return await gw.model(name)

    @app.get("/v1/experts", response_model=ExpertsResponse)
    async def experts():
        return await gw.experts()

    @app.post("/v1/route", response_model=RouteResponse)
    async def route(body: RouteRequest):
        return await gw.route(body)

    @app.post("/v1/score", response_model=ScoreResponse)
    async def score(body: ScoreRequest):
        return await gw.score(body)

    @app.post("/v1/generate", response_model=GenerateResponse,
              description="Continue a prompt; `stream: true` answers with server-sent events, one per text piece.")
    async def generate(body: GenerateRequest):
        return await gw.generate(body)

    @app.post("/v1/completions", description="A compatible subset of OpenAI's completions API (one choice per prompt).")
    async def completions(body: CompletionRequest):
        return await gw.completions(body)

    return app
