"""Server-sent event streams, and several request streams merged into one (OpenAI's `n` and prompt lists)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterator

from fastapi import HTTPException
from fastapi.responses import StreamingResponse

from hub.errors import HubError
from server.responses import status_of

log = logging.getLogger("hub.server")


def sse_event(event: dict | str) -> str:
    return f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n"


def sse(events: AsyncIterator[dict], openai: bool) -> StreamingResponse:
    """A server-sent event stream. After the first byte the status line is gone, so an error becomes the last
    event, `{"error": {"message", "code"}}`; OpenAI routes always end with `[DONE]`."""
    async def encode():
        try:
            async for event in events:
                yield sse_event(event)
        except Exception as err:  # the stream has started: report, whatever it is, in the stream
            status, message = (err.status_code, err.detail) if isinstance(err, HTTPException) else \
                (status_of(err), str(err)) if isinstance(err, HubError) else (500, "generation failed")
            if status >= 500:
                log.error("stream ended by an error: %r", err)
            yield sse_event({"error": {"message": message, "code": status}})
        if openai:
            yield sse_event("[DONE]")

    return StreamingResponse(encode(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def merged(streams: list[AsyncIterator[str]]) -> AsyncIterator[tuple[int, str | None]]:
    """(index, piece) from every stream as pieces arrive, and (index, None) when stream `index` has ended. The
    first error of any stream is raised; leaving early closes every stream (which cancels its request)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[str]) -> None:
        try:
            async for piece in stream:
                await queue.put((index, piece, None))
            await queue.put((index, None, None))
        except Exception as err:
            await queue.put((index, None, err))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, piece, error = await queue.get()
            if error is not None:
                raise error
            remaining -= piece is None
            yield index, piece
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
