"""OpenAI-compatible HTTP server (Starlette + uvicorn): /v1/chat/completions and /v1/models here;
/v1/completions, /v1/embeddings, /health and the tokenizer endpoints in agent/endpoints.py.

One model worker thread owns the Sampler and decodes queued requests in batches (see
ModelWorker): concurrent requests share decode steps, each with its own budget, stop strings and
stream, and each answered as soon as its own row ends. Streaming requests get server-sent events
in OpenAI's `chat.completion.chunk` format ending with `data: [DONE]`. A client that disconnects
mid-stream cancels its row at the next chunk boundary; the rest of its batch goes on.

Errors are OpenAI-shaped: {"error": {"message", "type": "invalid_request_error", "param",
"code"}} with status 400 (malformed or too deeply nested JSON, unknown fields, bad values,
n != 1, prompt + max_tokens over the context), 413 (a body over max_body_bytes, read to its end
so the connection stays usable) or 404. A client that hangs up mid-request is one warning line.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import threading
import time
import uuid
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from solo.agent import endpoints
from solo.agent.guards import Guards
from solo.agent.requests import MAX_BODY_BYTES, RequestError, error_response, parse, read_body
from solo.agent.sampler import Greedy, Sampler
from solo.agent.scoring import Scorer
from solo.agent.streaming import RowText
from solo.data.chat import chat_template

log = logging.getLogger("solo.server")

class _Job:
    """One row to generate. kind 'chat': the chat template's stop ids and reply prefix, output
    guards; 'raw' (/v1/completions): the tokenizer's stop ids, the model's text as it is."""

    def __init__(self, ids, max_new, sampling, seed, stop, stream, loop, seeded=False,
                 kind="chat"):
        self.ids, self.max_new, self.sampling, self.seed = ids, max_new, sampling, seed
        self.stop, self.stream, self.loop, self.kind = stop, stream, loop, kind
        self.method = sampling.method()
        # a seeded sampled request runs alone: its seed alone decides its answer
        self.batchable = not seeded or self.method == Greedy()
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.arrived = time.monotonic()

    def emit(self, kind: str, payload: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # event loop closed (server shutting down): nobody is listening
            self.cancelled.set()


class ModelWorker:
    """A daemon thread decoding queued requests in batches (static batching per decode call).

    When it is free, the worker takes the oldest request and every queued one that can share its
    decode call, up to `max_batch`: the same sampling method, and batchable (greedy, or no
    explicit seed). A batchable request waits at most `window_s` after its arrival for its batch
    to fill; requests that arrive while a batch runs wait for the next one. Rows keep their own
    budget, stop strings and stream, are answered as soon as they end, and a cancelled row
    (client gone) stops at the next chunk of `chunk` steps while the others go on.
    `batch_sizes` counts the batches run by size.
    """

    def __init__(self, sampler: Sampler, guards: Guards, chunk: int = 4, max_batch: int = 8,
                 window_s: float = 0.002):
        self.sampler, self.guards, self.chunk = sampler, guards, chunk
        self.template = chat_template(sampler.tokenizer)
        self.max_batch, self.window_s = max(1, max_batch), window_s
        self.pending: collections.deque[_Job] = collections.deque()
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.cv = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="solo-model-worker", daemon=True)
        self.thread.start()

    def submit(self, job: _Job) -> None:
        with self.cv:
            self.pending.append(job)
            self.cv.notify()

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify()

    def _next_batch(self) -> list[_Job] | None:
        """The oldest live request and the queued ones that can join it. A batchable request
        waits up to window_s after its arrival for company while its batch is not full."""
        with self.cv:
            while True:
                while self.pending and self.pending[0].cancelled.is_set():
                    self.pending.popleft()
                if not self.pending:
                    if self.closed:
                        return None
                    self.cv.wait()
                    continue
                head = self.pending[0]
                batch = [head] + [j for j in list(self.pending)[1:] if not j.cancelled.is_set()
                                  and head.batchable and j.batchable and j.method == head.method
                                  and j.kind == head.kind]
                batch = batch[: self.max_batch]
                wait = head.arrived + self.window_s - time.monotonic()
                if len(batch) == self.max_batch or not head.batchable or wait <= 0:
                    for job in batch:
                        self.pending.remove(job)
                    return batch
                self.cv.wait(timeout=wait)

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            self.batch_sizes[len(batch)] += 1
            try:
                self._generate(batch)
            except Exception as e:  # keep serving others
                log.exception("generation failed")
                for job in batch:
                    job.emit("error", str(e))

    def _generate(self, batch: list[_Job]) -> None:
        tok = self.sampler.tokenizer
        chat = batch[0].kind == "chat"
        # text is decoded per chunk where a stream, stop strings or guards need it; chat
        # replies are guarded as they grow: the stream and the answer are one decision
        rows = [RowText(tok, j.max_new, j.stop, len(j.ids), incremental=j.stream,
                        prefix=self.template.reply_prefix if chat else "",
                        guards=self.guards if chat else None, context=() if chat else j.ids)
                for j in batch]
        stop_rows = np.zeros((len(batch),), bool)
        it = self.sampler.iterate([j.ids for j in batch], max_new_tokens=[j.max_new for j in batch],
                                  method=batch[0].method, seed=batch[0].seed, chunk=self.chunk,
                                  stop_rows=stop_rows,
                                  stop_ids=self.template.stop_ids if chat else tok.stop_ids)
        try:
            for new, _, info in it:
                for i, (job, row) in enumerate(zip(batch, rows, strict=True)):
                    if row.finish:
                        continue
                    if job.cancelled.is_set():
                        log.info("generation cancelled (client went away)")
                        row.close("cancelled")
                    else:
                        delta = row.feed(new[i], info["stop"])
                        if job.stream and delta:
                            job.emit("delta", delta)
                        if row.finish:
                            self._answer(job, row)
                    stop_rows[i] = row.finish is not None
                if stop_rows.all():
                    break
        finally:
            it.close()
        for job, row in zip(batch, rows, strict=True):
            if not row.finish:  # the loop ran out of steps: every budget is spent
                self._answer(job, row)

    def _answer(self, job: _Job, row: RowText) -> None:
        gen, rest = row.close()
        if job.stream and rest:
            job.emit("delta", rest)
        action = None if gen.guard is None else gen.guard.action
        stop = [] if row.stop_token is None else [row.stop_token]
        job.emit("done", dict(text=gen.text, finish_reason=gen.finish_reason,
                              prompt_tokens=gen.prompt_tokens,
                              completion_tokens=len(gen.tokens), guard=action,
                              tokens=list(gen.tokens) + stop))


def make_app(sampler: Sampler | None, *, model_name: str = "solo", guards: Guards | None = None,
             max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, chunk: int = 4, max_batch: int = 8,
             batch_window_s: float = 0.002, max_body_bytes: int = MAX_BODY_BYTES,
             scorer: Scorer | None = None, chat_only: bool = False) -> Starlette:
    """The ASGI app. Defaults (max_new_tokens, temperature, ...) apply when a request omits them
    (normally config.agent's). The worker thread starts here and stops on app shutdown; see
    ModelWorker for max_batch and batch_window_s. scorer: log-probabilities and embeddings
    (default: one over the sampler's model, without an embedding head unless it has one);
    sampler None serves an encoder (embeddings only). chat_only: /v1/completions answers 400
    (agent/endpoints.py)."""
    if sampler is None and scorer is None:
        raise ValueError("make_app needs a sampler or a scorer")
    if scorer is None:
        scorer = Scorer(sampler.model, sampler.variables, sampler.tokenizer)
    tokenizer = sampler.tokenizer if sampler is not None else scorer.tokenizer
    template = chat_template(tokenizer)
    guards = guards or Guards(markers=template.marker_texts)
    worker = None if sampler is None else ModelWorker(sampler, guards, chunk=chunk,
                                                      max_batch=max_batch, window_s=batch_window_s)
    defaults = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    counter = iter(range(1 << 62))

    def submit(ids, max_new, req, j, kind):
        """A queued row for choice j of a request (a seeded request's choice j uses seed + j)."""
        seed = (req["seed"] + j) if req["seed"] is not None else next(counter)
        job = _Job(ids, max_new, req["sampling"], seed % (1 << 32), req["stop"], req["stream"],
                   asyncio.get_running_loop(), seeded=req["seed"] is not None, kind=kind)
        worker.submit(job)
        return job

    ctx = endpoints.Context(scorer=scorer, tokenizer=tokenizer, model_name=model_name,
                            max_body_bytes=max_body_bytes, chat_only=chat_only, sampler=sampler,
                            defaults=defaults, max_new_tokens=max_new_tokens, submit=submit)

    async def models(_request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": 0, "owned_by": "solo"}]})

    async def chat_completions(request: Request):
        try:
            body = await read_body(request, max_body_bytes)
            if sampler is None:
                raise RequestError(f"model {model_name!r} is an encoder: it has no chat "
                                   "completions, only /v1/embeddings", code="unsupported_model")
            req = parse(body, sampler, defaults)
            if req["logprobs"] is not None and not scorer.can_score:
                raise RequestError("'logprobs' needs a decoder-only model", param="logprobs")
            ids, _ = template.encode(req["messages"], add_generation_prompt=True)
            room = sampler.cache_len - len(ids)
            max_new = req["max_tokens"] or min(max_new_tokens, room)
            if room < 1 or len(ids) + max_new > sampler.cache_len:
                asked = (f"max_tokens={req['max_tokens']} more" if req["max_tokens"] else
                         "none left for the reply")
                raise RequestError(
                    f"this model's maximum context length is {sampler.cache_len} tokens; the "
                    f"messages use {len(ids)} tokens, {asked}", param="messages",
                    code="context_length_exceeded")
        except RequestError as e:
            return error_response(e)
        except ClientDisconnect:  # the client went away while sending: nobody to answer
            log.warning("client disconnected before its request was complete")
            return Response(status_code=499)
        d = guards.check_messages(req["messages"])
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        seed = req["seed"] if req["seed"] is not None else next(counter)
        if not d.allowed:  # refused by the input guard: answer with the refusal, no generation
            result = dict(text=d.text, finish_reason="stop", prompt_tokens=len(ids),
                          completion_tokens=0)
            job = None
        else:
            job = _Job(ids, max_new, req["sampling"], seed % (1 << 32), req["stop"],
                       req["stream"], asyncio.get_running_loop(), seeded=req["seed"] is not None)
            worker.submit(job)
        chunk_of = lambda delta, finish=None: "data: " + json.dumps({
            "id": rid, "object": "chat.completion.chunk", "created": created,
            "model": model_name, "choices": [{"index": 0, "delta": delta,
                                              "finish_reason": finish}]}) + "\n\n"

        if req["stream"]:
            async def events():
                try:
                    yield chunk_of({"role": "assistant", "content": ""})
                    if job is None:
                        yield chunk_of({"content": result["text"]})
                        yield chunk_of({}, "stop")
                        yield "data: [DONE]\n\n"
                        return
                    while True:
                        kind, payload = await job.events.get()
                        if kind == "delta":
                            yield chunk_of({"content": payload})
                        elif kind == "error":
                            yield "data: " + json.dumps({"error": {
                                "message": payload, "type": "server_error"}}) + "\n\n"
                            break
                        else:  # the deltas were the guarded reply (agent/streaming.RowText)
                            yield chunk_of({}, payload["finish_reason"])
                            break
                    yield "data: [DONE]\n\n"
                finally:  # normal end, or the client went away (generator cancelled)
                    if job is not None:
                        job.cancelled.set()

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        if job is not None:
            try:
                kind, payload = await job.events.get()
            finally:
                job.cancelled.set()
            if kind == "error":
                return JSONResponse({"error": {"message": payload, "type": "server_error",
                                               "param": None, "code": None}}, status_code=500)
            result = payload
        logprobs = None
        if req["logprobs"] is not None:
            # the reply's own tokens (its end-of-turn is not content)
            reply = result.get("tokens", [])[: result["completion_tokens"]]
            logprobs = await endpoints.reply_logprobs(ctx, ids, reply, req["logprobs"])
        usage = dict(prompt_tokens=result["prompt_tokens"],
                     completion_tokens=result["completion_tokens"],
                     total_tokens=result["prompt_tokens"] + result["completion_tokens"])
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                         "logprobs": logprobs, "finish_reason": result["finish_reason"]}],
            "usage": usage})

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        if worker is not None:
            worker.close()

    app = Starlette(routes=[Route("/v1/models", models, methods=["GET"]),
                            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                            *endpoints.routes(ctx)],
                    lifespan=lifespan)
    app.state.worker = worker
    return app


def app_from_loaded(loaded, *, embeddings: str = "head", **overrides) -> Starlette:
    """make_app from `solo.train.inference.load(...)` with config.agent defaults; an encoder
    run serves embeddings only. embeddings: 'head' (from an embedding head only) or 'mean'
    (mean-pooled hidden states for a model without one; agent/scoring.py)."""
    from solo.agent.chat import build_sampler  # local: keeps the module import light

    agent = loaded.config.agent
    markers = chat_template(loaded.tokenizer).marker_texts
    kw = dict(model_name=loaded.config.name, guards=Guards.from_config(agent, markers),
              max_new_tokens=agent.max_new_tokens, temperature=agent.temperature,
              top_k=agent.top_k, top_p=agent.top_p,
              scorer=Scorer(loaded.model, loaded.params, loaded.tokenizer, pooling=embeddings))
    kw.update(overrides)
    sampler = None if loaded.model.cfg.kind == "encoder" else build_sampler(loaded)
    return make_app(sampler, **kw)


def serve(workdir: str, *, host: str = "127.0.0.1", port: int = 8000,
          checkpoint: str | int = "latest", max_batch: int = 8,
          batch_window_s: float = 0.002, chat_only: bool = False,
          embeddings: str = "head") -> None:
    """`solo serve`: loads a workdir's checkpoint ('latest', 'best' or a step) and serves it at
    http://host:port/v1 until interrupted (see make_app for max_batch, batch_window_s and
    chat_only, app_from_loaded for embeddings)."""
    import uvicorn

    from solo.train.inference import load

    app = app_from_loaded(load(workdir, checkpoint), max_batch=max_batch,
                          batch_window_s=batch_window_s, chat_only=chat_only,
                          embeddings=embeddings)
    uvicorn.run(app, host=host, port=port)
