"""The server's endpoints beside chat (agent/server.py): what evaluation harnesses use.

  POST /v1/completions   raw text completion (no chat template, no guards): a prompt string
                         (encoded after the tokenizer's BOS, as training documents are) or token
                         ids (used as given), `max_tokens` (0 allowed), `logprobs` (top-k
                         alternatives per token), `echo` (the prompt and its log-probabilities),
                         `stop`, `n`. Refused with a 400 on a chat-only server (`solo serve
                         --chat-only`: the model is reachable only through its chat template and
                         guards) and on an encoder model.
  POST /v1/embeddings    L2-normalised embeddings (agent/scoring.py: the embed head, or mean-pooled
                         hidden states with `--embeddings mean`); a 400 for a model without one.
  GET  /health           200 {"status": "ok", ...} once the model is loaded.
  GET  /tokenizer_info, POST /tokenize, POST /detokenize   the model's tokenizer (vLLM's shapes;
                         lm-eval-harness's `tokenizer_backend=remote` reads them).

Log-probabilities come from the model's forward pass over prompt + completion (Scorer), so
they are the model's own log-softmax at each position whatever the sampling settings were.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from solo.agent.completions import chat_logprobs, completion_logprobs
from solo.agent.requests import (
    RequestError,
    error_response,
    load_json,
    parse_completion,
    parse_embedding,
    read_body,
)
from solo.agent.scoring import Scorer, ScoringError
from solo.data import framing


@dataclasses.dataclass
class Context:
    """What the endpoints share with the chat endpoint (built by server.make_app)."""

    scorer: Scorer
    tokenizer: Any
    model_name: str
    max_body_bytes: int
    chat_only: bool
    sampler: Any = None  # None: an encoder model (embeddings only)
    defaults: dict | None = None  # sampling defaults
    max_new_tokens: int = 16
    submit: Callable[..., Any] | None = None  # (ids, max_new, req, j, kind) -> job
    counter: Any = None


async def run(fn, *args):
    """Model work off the event loop."""
    return await asyncio.to_thread(fn, *args)


def refuse(message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return error_response(RequestError(message, param=param, code=code))


async def reply_logprobs(ctx: Context, ids: list[int], tokens: list[int], k: int) -> dict:
    """Chat-completions logprobs of a reply's tokens after the prompt ids."""
    (s,) = await run(ctx.scorer.score, [list(ids) + list(tokens)], k)
    return chat_logprobs(ctx.tokenizer, s, len(ids))


async def _wait(job) -> dict:
    try:
        kind, payload = await job.events.get()
    finally:
        job.cancelled.set()
    if kind == "error":
        raise RuntimeError(payload)
    return payload


async def completions(ctx: Context, request: Request) -> Response:
    tok = ctx.tokenizer
    try:
        body = await read_body(request, ctx.max_body_bytes)
        if ctx.chat_only:
            raise RequestError("this server is chat-only (solo serve --chat-only): raw "
                               "completions, echo and prompt log-probabilities are off; use "
                               "/v1/chat/completions", code="chat_only")
        if ctx.sampler is None:
            raise RequestError(f"model {ctx.model_name!r} is an encoder: it has no completions, "
                               "only /v1/embeddings", code="unsupported_model")
        req = parse_completion(body, ctx.sampler, ctx.defaults, ctx.scorer.cfg.vocab_size)
        scoring = req["logprobs"] is not None
        if scoring and not ctx.scorer.can_score:
            raise RequestError("'logprobs' needs a decoder-only model", param="logprobs")
        cache = ctx.sampler.cache_len
        rows = []  # (ids, first echoed token, prompt text, max_new)
        for i, p in enumerate(req["prompts"]):
            if isinstance(p, str):
                ids, first, text = framing.prompt(tok, p), len(framing.start(tok)), p
            else:
                ids, first, text = list(p), 0, tok.decode(p)
            if not ids:
                raise RequestError(f"prompt {i} is empty", param="prompt")
            max_new = req["max_tokens"] if req["max_tokens"] is not None else min(
                ctx.max_new_tokens, max(cache - len(ids), 0))
            if len(ids) + max_new > cache or (scoring and len(ids) + max_new > ctx.scorer.max_len):
                raise RequestError(
                    f"this model's maximum context length is {cache} tokens; prompt {i} uses "
                    f"{len(ids)} tokens and max_tokens={max_new} more", param="prompt",
                    code="context_length_exceeded")
            rows.append((ids, first, text, max_new))
    except RequestError as e:
        return error_response(e)
    except ClientDisconnect:
        return Response(status_code=499)
    n = req["n"]
    jobs = [ctx.submit(ids, max_new, req, j, "raw") if max_new > 0 else None
            for ids, _, _, max_new in rows for j in range(n)]
    try:
        results = [await _wait(job) if job is not None else
                   dict(text="", finish_reason="length", completion_tokens=0, tokens=[])
                   for job in jobs]
    except RuntimeError as e:
        return JSONResponse({"error": {"message": str(e), "type": "server_error",
                                       "param": None, "code": None}}, status_code=500)
    finally:
        for job in jobs:
            if job is not None:
                job.cancelled.set()
    scores = None
    if scoring:
        seqs = [rows[c // n][0] + results[c]["tokens"] for c in range(len(results))]
        try:
            scores = await run(ctx.scorer.score, seqs, req["logprobs"])
        except ScoringError as e:
            return refuse(str(e), param="prompt")
    choices = []
    for c, res in enumerate(results):
        ids, start, prompt_text, _ = rows[c // n]
        # the row's text is already the continuation decoded after the prompt (RowText context)
        text = (prompt_text + res["text"]) if req["echo"] else res["text"]
        logprobs = None
        if scores is not None:
            logprobs = completion_logprobs(tok, scores[c], start if req["echo"] else len(ids))
        choices.append({"index": c, "text": text, "logprobs": logprobs,
                        "finish_reason": res["finish_reason"]})
    prompt_tokens = sum(len(r[0]) for r in rows)
    completion_tokens = sum(r["completion_tokens"] for r in results)
    return JSONResponse({
        "id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
        "created": int(time.time()), "model": ctx.model_name, "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens}})


async def embeddings(ctx: Context, request: Request) -> Response:
    try:
        req = parse_embedding(await read_body(request, ctx.max_body_bytes),
                              ctx.scorer.cfg.vocab_size)
        why = ctx.scorer.embedding_error()
        if why:
            raise RequestError(f"model {ctx.model_name!r}: {why}", param="model",
                               code="no_embedding_head")
        rows = [ctx.scorer.text_ids(x) if isinstance(x, str) else list(x)
                for x in req["inputs"]]
        e = await run(ctx.scorer.embed, rows)
    except RequestError as err:
        return error_response(err)
    except ScoringError as err:
        return refuse(str(err), param="input")
    except ClientDisconnect:
        return Response(status_code=499)

    def encode(v: np.ndarray):
        if req["encoding_format"] == "base64":
            return base64.b64encode(v.astype("<f4").tobytes()).decode()
        return [float(x) for x in v]

    used = sum(map(len, rows))
    return JSONResponse({
        "object": "list", "model": ctx.model_name,
        "data": [{"object": "embedding", "index": i, "embedding": encode(v)}
                 for i, v in enumerate(e)],
        "usage": {"prompt_tokens": used, "total_tokens": used}})


async def health(ctx: Context, _request: Request) -> Response:
    return JSONResponse({"status": "ok", "model": ctx.model_name, "kind": ctx.scorer.cfg.kind,
                         "chat_only": ctx.chat_only,
                         "embeddings": ctx.scorer.embedding_error() is None})


def _special(tok, name: str) -> str | None:
    i = getattr(tok, f"{name}_id", None)
    return None if i is None else tok.id_to_piece(i)


async def tokenizer_info(ctx: Context, _request: Request) -> Response:
    tok = ctx.tokenizer
    return JSONResponse({"eos_token": _special(tok, "eos"), "bos_token": _special(tok, "bos"),
                         "pad_token": _special(tok, "pad"), "vocab_size": tok.vocab_size,
                         "model_max_length": ctx.scorer.max_len})


async def tokenize(ctx: Context, request: Request) -> Response:
    """{"prompt": str, "add_special_tokens": bool} -> {"tokens": [...]}; with special tokens the
    ids start with BOS as a completion prompt string's do."""
    try:
        req = load_json(await read_body(request, ctx.max_body_bytes),
                        {"model", "prompt", "add_special_tokens"})
        if not isinstance(req.get("prompt"), str):
            raise RequestError("'prompt' must be a string", param="prompt")
    except RequestError as e:
        return error_response(e)
    ids = (framing.prompt(ctx.tokenizer, req["prompt"]) if req.get("add_special_tokens", True)
           else ctx.tokenizer.encode(req["prompt"]))
    return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": ctx.scorer.max_len})


async def detokenize(ctx: Context, request: Request) -> Response:
    try:
        req = load_json(await read_body(request, ctx.max_body_bytes), {"model", "tokens"})
        toks = req.get("tokens")
        if not isinstance(toks, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in toks):
            raise RequestError("'tokens' must be a list of token ids", param="tokens")
    except RequestError as e:
        return error_response(e)
    return JSONResponse({"prompt": ctx.tokenizer.decode(toks)})


def routes(ctx: Context) -> list[Route]:
    def bind(fn):
        async def endpoint(request: Request):
            return await fn(ctx, request)
        return endpoint

    return [Route("/v1/completions", bind(completions), methods=["POST"]),
            Route("/v1/embeddings", bind(embeddings), methods=["POST"]),
            Route("/health", bind(health), methods=["GET"]),
            Route("/tokenizer_info", bind(tokenizer_info), methods=["GET"]),
            Route("/tokenize", bind(tokenize), methods=["POST"]),
            Route("/detokenize", bind(detokenize), methods=["POST"])]
