"""OpenAI chat-completions requests: reading the body safely, validating every field, and the
OpenAI-shaped error a bad one gets (see agent/server.py)."""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import JSONResponse

from solo.agent.sampler import Sampler, Sampling

ALLOWED_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature",
                  "top_p", "top_k", "stop", "stream", "stream_options", "n", "seed", "user"}
ROLES = ("system", "user", "assistant")


class RequestError(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def error_response(e: RequestError) -> JSONResponse:
    return JSONResponse({"error": {"message": e.message, "type": "invalid_request_error",
                                   "param": e.param, "code": e.code}}, status_code=e.status)


MAX_BODY_BYTES = 1 << 20  # a chat request is a few KB: the model's context is a few K tokens
MAX_JSON_DEPTH = 32  # the chat API nests 4 deep (messages, content parts)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body; over `limit` bytes the rest is read and dropped (so the keep-alive
    connection stays usable) and the request is refused."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise RequestError(f"request body of {size} bytes is over the limit of {limit}",
                           code="request_too_large", status=413)
    return b"".join(chunks)


def check_depth(body: bytes, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuses JSON nested deeper than `limit` before parsing it (Python's parser recurses)."""
    depth, in_str, escaped = 0, False, False
    for c in body:
        if in_str:
            if escaped:
                escaped = False
            elif c == 0x5C:  # backslash
                escaped = True
            elif c == 0x22:  # quote
                in_str = False
        elif c == 0x22:
            in_str = True
        elif c in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                raise RequestError(f"JSON nested deeper than {limit} levels",
                                   code="invalid_json")
        elif c in (0x5D, 0x7D):
            depth -= 1


def parse(body: bytes, sampler: Sampler, defaults: dict) -> dict:
    check_depth(body)
    try:
        req = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"malformed JSON body: {e}", code="invalid_json") from None
    if not isinstance(req, dict):
        raise RequestError("request body must be a JSON object")
    unknown = sorted(set(req) - ALLOWED_FIELDS)
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; supported: {sorted(ALLOWED_FIELDS)}",
                           param=unknown[0], code="unknown_field")
    msgs = req.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(f"messages[{i}] needs role in {ROLES}", param=f"messages[{i}]")
        content = m.get("content", "")
        if isinstance(content, list):  # OpenAI content parts: text only
            try:
                content = "".join(p["text"] for p in content if p.get("type") == "text")
            except (TypeError, KeyError, AttributeError):
                raise RequestError(f"messages[{i}].content parts must be text",
                                   param=f"messages[{i}].content") from None
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string",
                               param=f"messages[{i}].content")
        messages.append(dict(role=m["role"], content=content))

    def num(name, typ, lo, hi, default):
        v = req.get(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (typ is int and v != int(v)):
            raise RequestError(f"'{name}' must be a number", param=name)
        if not lo <= v <= hi:
            raise RequestError(f"'{name}'={v} out of range [{lo}, {hi}]", param=name)
        return typ(v)

    if num("n", int, 1, 1, 1) != 1:  # pragma: no cover (range check catches it)
        raise RequestError("only n=1 is supported", param="n")
    stop = req.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise RequestError("'stop' must be a string or a list of up to 4 strings", param="stop")
    stream = req.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be a boolean", param="stream")
    max_tokens = req.get("max_completion_tokens", req.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in req else "max_tokens"
    max_tokens = num(name, int, 1, sampler.cache_len, None) if max_tokens is not None else None
    sampling = Sampling(temperature=num("temperature", float, 0.0, 2.0, defaults["temperature"]),
                        top_k=num("top_k", int, 0, 1 << 20, defaults["top_k"]),
                        top_p=num("top_p", float, 1e-6, 1.0, defaults["top_p"]))
    seed = num("seed", int, -(1 << 63), (1 << 63) - 1, None)
    return dict(messages=messages, max_tokens=max_tokens, sampling=sampling, stop=stop,
                stream=stream, seed=seed)
