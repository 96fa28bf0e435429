"""Token streams of the ingress: a generation decoded to text as it arrives, server-sent events, and OpenAI's
completion choices (several prompts' streams merged as their pieces come).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse


class Generation:
    """One request's token stream, decoded into text as it arrives (never splitting a UTF-8 character)."""

    def __init__(self, experts, weights, route, prompt_tokens: int, tokens, tok, eos: int):
        self.experts, self.weights, self.route, self.prompt_tokens = experts, weights, route, prompt_tokens
        self.tokens, self.tok, self.eos = tokens, tok, eos
        self.ids: list[int] = []
        self.finish_reason = "length"

    @property
    def n(self) -> int:
        return len(self.ids)

    async def deltas(self) -> AsyncIterator[str]:
        shown = ""
        async for t in self.tokens:
            if t == self.eos:
                self.finish_reason = "stop"
                break
            self.ids.append(t)
            text = self.tok.decode(self.ids)
            if not text.endswith("\ufffd") and len(text) > len(shown):  # a character still incomplete: wait
                yield text[len(shown):]
                shown = text
        text = self.tok.decode(self.ids)
        if len(text) > len(shown):
            yield text[len(shown):]

    async def collect(self) -> tuple[str, int, str]:
        text = "".join([d async for d in self.deltas()])
        return text, self.n, self.finish_reason


def sse(events: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events: `data: {json}` per event, then `data: [DONE]`."""

    async def body():
        try:
            async for e in events:
                yield f"data: {json.dumps(e)}\n\n"
        except Exception as e:  # the status line is gone: report the failure in the stream
            yield f"event: error\ndata: {json.dumps({'error': {'message': f'{type(e).__name__}: {e}'}})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


def choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}


async def choice_stream(index: int, run: Generation) -> AsyncIterator[dict]:
    async for delta in run.deltas():
        yield choice(index, delta, None)
    yield choice(index, "", run.finish_reason)


def usage(runs: list[Generation]) -> dict:
    prompt, completion = sum(r.prompt_tokens for r in runs), sum(r.n for r in runs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def merged(streams: list[AsyncIterator]) -> AsyncIterator:
    """The items of several async iterators as each comes; the first error raises here."""
    queue, done = asyncio.Queue(), object()

    async def pump(stream):
        try:
            async for item in stream:
                await queue.put(item)
            await queue.put(done)
        except Exception as e:
            await queue.put(e)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        for _ in tasks:
            while (item := await queue.get()) is not done:
                if isinstance(item, Exception):
                    raise item
                yield item
    finally:
        for t in tasks:
            t.cancel()
