"""OpenAI requests (chat completions, text completions, embeddings): reading the body safely,
validating every field, and the OpenAI-shaped error a bad one gets (see agent/server.py)."""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import JSONResponse

from solo.agent.sampler import Sampler, Sampling

ALLOWED_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature",
                  "top_p", "top_k", "stop", "stream", "stream_options", "n", "seed", "user",
                  "logprobs", "top_logprobs"}
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


def load_json(body: bytes, allowed: set[str]) -> dict:
    """The body as a JSON object whose fields are all in `allowed`."""
    check_depth(body)
    try:
        req = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"malformed JSON body: {e}", code="invalid_json") from None
    if not isinstance(req, dict):
        raise RequestError("request body must be a JSON object")
    unknown = sorted(set(req) - allowed)
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; supported: {sorted(allowed)}",
                           param=unknown[0], code="unknown_field")
    return req


def number(req: dict, name: str, typ: type, lo: float, hi: float, default):
    """req[name] as typ within [lo, hi] (default when absent or null)."""
    v = req.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (typ is int and v != int(v)):
        raise RequestError(f"'{name}' must be a number", param=name)
    if not lo <= v <= hi:
        raise RequestError(f"'{name}'={v} out of range [{lo}, {hi}]", param=name)
    return typ(v)


def flag(req: dict, name: str) -> bool:
    v = req.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise RequestError(f"'{name}' must be a boolean", param=name)
    return v


def generation_fields(req: dict, sampler: Sampler, defaults: dict, *, min_tokens: int = 1,
                      max_n: int = 1) -> dict:
    """The fields chat and text completions share: n, stop, stream, max_tokens, sampling, seed."""
    n = number(req, "n", int, 1, max_n, 1)
    stop = req.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise RequestError("'stop' must be a string or a list of up to 4 strings", param="stop")
    stream = flag(req, "stream")
    max_tokens = req.get("max_completion_tokens", req.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in req else "max_tokens"
    max_tokens = (number(req, name, int, min_tokens, sampler.cache_len, None)
                  if max_tokens is not None else None)
    sampling = Sampling(
        temperature=number(req, "temperature", float, 0.0, 2.0, defaults["temperature"]),
        top_k=number(req, "top_k", int, 0, 1 << 20, defaults["top_k"]),
        top_p=number(req, "top_p", float, 1e-6, 1.0, defaults["top_p"]))
    seed = number(req, "seed", int, -(1 << 63), (1 << 63) - 1, None)
    return dict(n=n, max_tokens=max_tokens, sampling=sampling, stop=stop, stream=stream,
                seed=seed)


def parse(body: bytes, sampler: Sampler, defaults: dict) -> dict:
    """A chat-completions request: messages, sampling, and `logprobs`/`top_logprobs`."""
    req = load_json(body, ALLOWED_FIELDS)
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
    out = generation_fields(req, sampler, defaults)
    logprobs = flag(req, "logprobs")
    top = number(req, "top_logprobs", int, 0, MAX_TOP_LOGPROBS, None)
    if top is not None and not logprobs:
        raise RequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    if logprobs and out["stream"]:
        raise RequestError("'logprobs' is not supported with 'stream': true", param="logprobs")
    return dict(messages=messages, logprobs=(top or 0) if logprobs else None, **out)


MAX_TOP_LOGPROBS = 20
MAX_PROMPTS = 64  # prompts in one /v1/completions request
COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop",
                     "stream", "n", "seed", "user", "echo", "logprobs", "best_of"}
EMBEDDING_FIELDS = {"model", "input", "encoding_format", "user"}


def _token_list(x) -> bool:
    return isinstance(x, list) and bool(x) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in x)


def prompt_rows(value, name: str, vocab_size: int) -> list[str | list[int]]:
    """OpenAI's prompt/input forms: a string, a list of strings, a list of token ids, or a list
    of token-id lists -> a list of strings and id lists."""
    if isinstance(value, str):
        rows = [value]
    elif _token_list(value):
        rows = [value]
    elif isinstance(value, list) and value and all(
            isinstance(v, str) or _token_list(v) for v in value):
        rows = list(value)
    else:
        raise RequestError(f"'{name}' must be a string, a list of strings, a list of token ids "
                           "or a list of token-id lists (non-empty)", param=name)
    if len(rows) > MAX_PROMPTS:
        raise RequestError(f"'{name}' has {len(rows)} items; at most {MAX_PROMPTS}", param=name)
    for r in rows:
        if not isinstance(r, str) and not all(0 <= t < vocab_size for t in r):
            raise RequestError(f"'{name}' has a token id outside [0, {vocab_size})", param=name)
    return rows


def parse_completion(body: bytes, sampler: Sampler, defaults: dict, vocab_size: int) -> dict:
    """A text-completions request (legacy OpenAI /v1/completions)."""
    req = load_json(body, COMPLETION_FIELDS)
    if "prompt" not in req:
        raise RequestError("'prompt' is required", param="prompt")
    prompts = prompt_rows(req["prompt"], "prompt", vocab_size)
    out = generation_fields(req, sampler, defaults, min_tokens=0, max_n=16)
    if number(req, "best_of", int, 1, 16, out["n"]) != out["n"]:
        raise RequestError("'best_of' must equal 'n' (no server-side ranking)", param="best_of")
    if out["stream"]:
        raise RequestError("'stream' is not supported on /v1/completions", param="stream")
    return dict(prompts=prompts, echo=flag(req, "echo"),
                logprobs=number(req, "logprobs", int, 0, MAX_TOP_LOGPROBS, None), **out)


def parse_embedding(body: bytes, vocab_size: int) -> dict:
    req = load_json(body, EMBEDDING_FIELDS)
    if "input" not in req:
        raise RequestError("'input' is required", param="input")
    fmt = req.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise RequestError("'encoding_format' must be 'float' or 'base64'",
                           param="encoding_format")
    return dict(inputs=prompt_rows(req["input"], "input", vocab_size), encoding_format=fmt)
