"""Server-sent events from llama-server's OpenAI-compatible endpoints, over http.client (no extra dependency)."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from glmgguf.errors import GlmggufError


class StreamError(GlmggufError, RuntimeError):
    """A request that failed; `retryable` when trying again may help (connection lost, 5xx, cut stream)."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


def stream_events(base_url: str, path: str, payload: dict[str, Any],
                  idle_timeout: float = 900.0) -> Iterator[dict[str, Any]]:
    """POST `payload` (with `stream: true`) and yield each decoded `data:` event until `[DONE]`.

    There is no limit on the total time; only a socket silent for `idle_timeout` seconds fails. Closing the
    generator closes the connection, which makes llama-server cancel the generation.
    """
    url = urlsplit(base_url)
    if url.scheme != "http" or not url.hostname:
        raise StreamError(f"server URL must look like http://HOST:PORT, not {base_url!r}", retryable=False)
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=idle_timeout)
    try:
        conn.request("POST", url.path.rstrip("/") + path, body=json.dumps({**payload, "stream": True}),
                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        resp = conn.getresponse()
        if resp.status != 200:
            body = resp.read(2000).decode(errors="replace")
            raise StreamError(f"HTTP {resp.status}: {body}", retryable=resp.status >= 500 or resp.status == 429)
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            event = json.loads(data)
            if "error" in event:
                raise StreamError(f"server error: {event['error']}", retryable=False)
            yield event
        raise StreamError("the stream ended without [DONE]", retryable=True)
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as e:
        raise StreamError(f"{type(e).__name__}: {e}", retryable=True) from e
    finally:
        conn.close()
