"""Batched, KV-cached sampling from a `solo.model.Transformer` (gemma-sampler style).

Sampling methods (agent/sampling.py, re-exported here) are frozen dataclass pytrees: their kind
is static and their values traced, so a new temperature or top-p never recompiles.

`Sampler.generate` runs one jitted prefill and one jitted decode loop, both through the model's
own `Transformer.decode` (one path for decoder-only and encoder-decoder models). Prompts are
left-padded (see model/kvcache.py) and bucketed to powers of two, so a new prompt length rarely
recompiles; batch sizes are bucketed too. The loop is a `lax.while_loop` over a typed
`SamplingState` (donated, so the cache is updated in place) that stops at a dynamic step bound:
the same compiled loop serves the non-streaming path (one call per cache segment) and streaming
(calls of `chunk` tokens, yielding text between them). The cache is allocated in up to 4
segments (`_windows`) and grown between loop calls, so a step's attention reads only the
allocated slots. Encoder-decoder models encode the source once, in the prefill, and keep it in
the state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from solo.agent.guards import Guards
from solo.agent.sampling import (  # noqa: F401  (re-exported: the sampler's public API)
    Compose,
    Greedy,
    Sampling,
    Temperature,
    TopK,
    TopP,
    as_method,
)
from solo.agent.streaming import Generation, RowText  # noqa: F401  (Generation: re-exported)
from solo.compile_options import compiler_options
from solo.data import framing
from solo.data.tokenizer import BOS_ID, EOS_ID, EOT_ID, PAD_ID
from solo.model import DecodeCache, Transformer, init_cache, unstack_layers


def _bucket(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


def _windows(length: int, slots: int, segments: int = 4) -> tuple[int, ...]:
    """Cache sizes, grown between decode segments: the prompt bucket plus steps of at least 64
    slots (multiples of 32), at most `segments` of them, ending at `slots`. Attention cost per
    step follows the allocated size, so early steps read less of the cache."""
    step = max(64, -(-(slots - length) // (32 * segments)) * 32)
    return tuple(range(min(slots, length + step), slots, step)) + (slots,)


@flax.struct.dataclass
class SamplingState:
    """The decode loop's carry. B rows (batch bucket), N = the output buffer's length."""

    cache: DecodeCache
    tok: jax.Array  # [B] int32: the last sampled token of each row
    out: jax.Array  # [B, N] int32: sampled tokens (PAD after a row is done)
    step: jax.Array  # int32 []: tokens sampled so far
    done: jax.Array  # [B] bool
    count: jax.Array  # [B] int32: tokens sampled by each row
    key: jax.Array  # the request's PRNG key; step s samples with fold_in(key, s)
    max_new: jax.Array  # [B] int32: each row's budget
    encoded: jax.Array | None = None  # encoder_decoder: the encoded source [B, Ls, D]
    src_segment_ids: jax.Array | None = None  # encoder_decoder: [B, Ls]


class Sampler:
    """Batched generation with a KV cache. See module docstring.

    Args:
      model: a `Transformer` (kind 'decoder' or 'encoder_decoder').
      params: the 'params' tree (or a {'params': ...} variables dict); boxed metadata is removed.
      tokenizer: `solo.data.tokenizer.Tokenizer` (needed for text in/out and stop strings).
      cache_len: the context: prompt + max_new_tokens must fit (default: model max_len).
      stop_ids: tokens that end a row (not included in the output); default the tokenizer's.
      overflow: 'error' (default: prompt + budget > cache_len raises ValueError) or 'truncate_left'
        (keep the newest prompt tokens that fit; encoder_decoder sources are right-truncated).
    """

    def __init__(self, model: Transformer, params, tokenizer=None, *, cache_len: int | None = None,
                 stop_ids: Sequence[int] | None = None, overflow: str = "error",
                 min_bucket: int = 16):
        cfg = model.cfg
        if cfg.kind == "encoder":
            raise ValueError("Sampler needs a 'decoder' or 'encoder_decoder' model")
        if overflow not in ("error", "truncate_left"):
            raise ValueError(f"overflow must be 'error' or 'truncate_left', got {overflow!r}")
        params = nn.meta.unbox(params)
        params = params["params"] if "params" in params else params
        cfg, params = unstack_layers(cfg, params)  # decoding runs unrolled layers
        self.variables = {"params": params}
        self.model, self.cfg, self.tokenizer = Transformer(cfg), cfg, tokenizer
        self.cache_len = int(cache_len or cfg.max_len)
        if cfg.positions == "learned" and self.cache_len > cfg.max_len:
            raise ValueError(f"cache_len={self.cache_len} > max_len={cfg.max_len} (learned "
                             "positions cannot extrapolate)")
        if stop_ids is None:  # the tokenizer's end of text (and solo's end of turn)
            stop_ids = tokenizer.stop_ids if tokenizer is not None else (EOS_ID, EOT_ID)
        self.stop_ids = tuple(int(i) for i in stop_ids)
        # an encoder-decoder's first decoder token (data/framing.py: as seq2seq training rows)
        self.bos_id = BOS_ID if tokenizer is None else (
            framing.decoder_start(tokenizer) if cfg.kind == "encoder_decoder"
            else tokenizer.bos_id)
        self.overflow = overflow
        self.min_bucket = min_bucket
        opts = compiler_options("decode")
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("slots",),
                                compiler_options=opts)
        self._loop = jax.jit(self._loop_impl, donate_argnums=(1,), compiler_options=opts)
        self._grow = jax.jit(lambda s, slots: s.replace(cache=s.cache.grow(slots)),
                             static_argnums=(1,))

    # --- jitted pieces -------------------------------------------------------------------------

    def _prefill_impl(self, variables, prompt_BL, lengths_B, src_BL, key, method, stop_ids,
                      max_new_B, *, slots) -> SamplingState:
        """Runs the left-padded prompts through a fresh cache of `slots` slots and samples the
        first token."""
        model = self.model
        b, length = prompt_BL.shape
        enc = {}
        if self.cfg.kind == "encoder_decoder":
            src_seg = (src_BL != PAD_ID).astype(jnp.int32)
            enc = dict(encoded=model.apply(variables, dict(src_tokens=src_BL,
                                                            src_segment_ids=src_seg),
                                           method=Transformer.encode),
                       src_segment_ids=src_seg)
        cache = init_cache(self.cfg, b, slots, length - lengths_B)
        logits_B1V, cache = model.apply(variables, prompt_BL, cache, last_only=True,
                                        method=Transformer.decode, **enc)
        tok_B = method(logits_B1V[:, 0], jax.random.fold_in(key, 0))
        return SamplingState(
            cache=cache, tok=tok_B,
            out=jnp.full((b, self.cache_len), PAD_ID, jnp.int32).at[:, 0].set(tok_B),
            step=jnp.int32(1), done=jnp.isin(tok_B, stop_ids) | (max_new_B <= 1),
            count=jnp.ones((b,), jnp.int32), key=key, max_new=max_new_B, **enc)

    def _loop_impl(self, variables, state: SamplingState, until, method, stop_ids
                   ) -> SamplingState:
        """Decodes while step < until and some row is not done (finished rows idle); the host
        keeps `until` within the allocated cache (see iterate)."""
        model = self.model

        def cond(s: SamplingState):
            return (s.step < until) & ~jnp.all(s.done)

        def body(s: SamplingState) -> SamplingState:
            logits_B1V, cache = model.apply(variables, s.tok[:, None], s.cache,
                                            encoded=s.encoded, src_segment_ids=s.src_segment_ids,
                                            method=Transformer.decode)
            tok_B = method(logits_B1V[:, 0], jax.random.fold_in(s.key, s.step))
            tok_B = jnp.where(s.done, PAD_ID, tok_B)
            count = s.count + (~s.done).astype(jnp.int32)
            done = s.done | jnp.isin(tok_B, stop_ids) | (count >= s.max_new)
            return s.replace(cache=cache, tok=tok_B, out=s.out.at[:, s.step].set(tok_B),
                             step=s.step + 1, done=done, count=count)

        return jax.lax.while_loop(cond, body, state)

    # --- host side -----------------------------------------------------------------------------

    def _prepare(self, prompts: Sequence[Sequence[int]], max_new_rows: Sequence[int]):
        s = self.cache_len
        rows = []
        for i, (p, max_new) in enumerate(zip(prompts, max_new_rows, strict=True)):
            if max_new < 1:
                raise ValueError(f"max_new_tokens must be >= 1, got {max_new}")
            if max_new >= s:
                raise ValueError(f"max_new_tokens={max_new} does not fit the cache ({s} slots)")
            p = [int(t) for t in p]
            if not p:
                raise ValueError(f"prompt {i} is empty (start it with BOS)")
            if len(p) + max_new > s:
                if self.overflow == "error":
                    raise ValueError(
                        f"prompt {i} has {len(p)} tokens + max_new_tokens={max_new} = "
                        f"{len(p) + max_new} > cache_len={s}; shorten the prompt, lower "
                        "max_new_tokens, or use overflow='truncate_left'")
                p = p[len(p) + max_new - s:]
            rows.append(p)
        return rows

    def _start(self, prompts, max_new_tokens, method, seed, src=None, stop_ids=None):
        """Pads, buckets and prefills. Returns (state, n_rows, prompt lengths, method, stop)."""
        method = as_method(method)
        max_new_rows = _per_row(max_new_tokens, len(prompts))
        max_new = max(max_new_rows, default=1)
        if self.cfg.kind == "encoder_decoder":
            if src is None:  # the prompts are the (framed) sources; the decoder starts at BOS
                src, prompts = prompts, [[self.bos_id]] * len(prompts)
            src = [list(map(int, x)) for x in src]
            if any(len(x) > self.cfg.max_len for x in src):
                if self.overflow == "error":
                    raise ValueError(f"source longer than max_len={self.cfg.max_len}")
                src = [x[: self.cfg.max_len] for x in src]
        rows = self._prepare(prompts, max_new_rows)
        n = len(rows)
        b = _bucket(n, 1)
        lens = [len(r) for r in rows]
        length = min(_bucket(max(lens), self.min_bucket), self.cache_len)
        prompt = np.full((b, length), PAD_ID, np.int32)
        lengths = np.ones((b,), np.int32)  # batch-padding rows: one (PAD) token
        for i, r in enumerate(rows):  # left-padded: every row writes the same slot each step
            prompt[i, length - len(r):] = r
            lengths[i] = len(r)
        # the cache holds the prompt bucket + the budget rounded up to 32 slots (the cache_len
        # check above still applies), allocated in segments (see _windows)
        windows = _windows(length, length + -(-max_new // 32) * 32)
        max_new_b = np.ones((b,), np.int32)  # batch-padding rows finish immediately
        max_new_b[:n] = max_new_rows
        src_arr = np.zeros((b, 1), np.int32)
        if self.cfg.kind == "encoder_decoder":
            ls = min(_bucket(max(map(len, src)), self.min_bucket), self.cfg.max_len)
            src_arr = np.full((b, ls), PAD_ID, np.int32)
            for i, x in enumerate(src):
                src_arr[i, : len(x)] = x
        stop_ids = self.stop_ids if stop_ids is None else tuple(stop_ids)
        stop = jnp.asarray(stop_ids or (-1,), jnp.int32)
        state = self._prefill(self.variables, jnp.asarray(prompt), jnp.asarray(lengths),
                              jnp.asarray(src_arr), jax.random.key(int(seed)), method, stop,
                              jnp.asarray(max_new_b), slots=windows[0])
        return state, n, lens, method, stop, (length, windows)

    def iterate(self, prompts: Sequence[Sequence[int]], *,
                max_new_tokens: int | Sequence[int] = 64,
                method=None, seed: int = 0, chunk: int = 0, src=None,
                stop_rows: np.ndarray | None = None, stop_ids: Sequence[int] | None = None,
                ) -> Iterator[tuple[np.ndarray, np.ndarray, dict]]:
        """Low level: yields (new_tokens [n, t], done [n], info) after prefill and after each
        chunk of decode steps (chunk 0 = everything at once). Rows already done carry PAD.
        Setting stop_rows[i] = True (a bool array of n the caller owns) between chunks finishes
        row i early (host-side stop strings). stop_ids overrides the sampler's stop tokens (a
        traced array: no recompile unless their number changes)."""
        state, n, lens, method, stop, (length, windows) = self._start(
            prompts, max_new_tokens, method, seed, src, stop_ids)
        early = np.zeros((state.done.shape[0],), bool)
        stop_set = set(np.asarray(stop).tolist())
        first = np.asarray(state.tok)[:n, None]
        yield first, np.asarray(state.done)[:n], dict(lens=lens, stop=stop_set)
        pos = 1
        limit = max(_per_row(max_new_tokens, n))
        while pos < limit:
            if stop_rows is not None and stop_rows.any():
                early[:n] = stop_rows
                state = state.replace(done=state.done | jnp.asarray(early))
            if bool(np.all(np.asarray(state.done))):
                return
            until = limit if chunk <= 0 else min(limit, pos + chunk)
            slots = state.cache.slots  # step `pos` writes slot length+pos-1: grow when full
            if length + pos - 1 >= slots:
                slots = next(w for w in windows if w > length + pos - 1)
                state = self._grow(state, slots)
            until = min(until, slots - length + 1)
            state = self._loop(self.variables, state, jnp.int32(until), method, stop)
            step = int(state.step)
            new = np.asarray(state.out[:n, pos:step])
            pos = step
            yield new, np.asarray(state.done)[:n], dict(lens=lens, stop=stop_set)

    def generate_ids(self, prompts: Sequence[Sequence[int]], *,
                     max_new_tokens: int | Sequence[int] = 64, method=None, seed: int = 0,
                     src=None, stop_ids: Sequence[int] | None = None,
                     ) -> tuple[list[list[int]], list[str]]:
        """Fast path (no streaming, no stop strings): token ids per row (stop token excluded)
        and finish reasons."""
        rows = [RowText(None, m, incremental=False)
                for m in _per_row(max_new_tokens, len(prompts))]
        for new, _, info in self.iterate(prompts, max_new_tokens=max_new_tokens, method=method,
                                         seed=seed, src=src, stop_ids=stop_ids):
            for row, ids in zip(rows, new, strict=True):
                row.feed(ids, info["stop"])
        gens = [row.close()[0] for row in rows]
        return [g.tokens for g in gens], [g.finish_reason for g in gens]

    def generate(self, prompts: Sequence[str | Sequence[int]], *,
                 max_new_tokens: int | Sequence[int] = 64,
                 method=None, seed: int = 0, stop: Sequence[str] = (),
                 stream_cb: Callable[[int, str], None] | None = None, chunk: int = 8,
                 src=None, stop_ids: Sequence[int] | None = None,
                 prefix: str = "", guards: Guards | None = None,
                 continuation: bool = True) -> list[Generation]:
        """Generates for a batch of prompts (text, framed by data/framing.py as training framed
        it, or token lists taken as they are).

        Decoder-only: a text prompt is framing.prompt ([BOS] text). Encoder-decoder: without
        `src` the prompts are the sources (text: framing.source, text [EOS], as seq2seq_rows
        frames it) and the decoder starts at BOS; with `src` (the sources) a text prompt is the
        decoder's start, [BOS] text.

        Rows end independently at a stop token, a stop string (text cut before it) or their
        max_new_tokens (one budget, or one per row). stream_cb(row, text_delta) is called as
        text becomes final (held back while it could still be the start of a stop string).
        Without stream_cb, stop strings and guards the whole decode is one jitted call.
        `prefix` is dropped from the start of each row's text (a chat template's content
        prefix). `guards` (agent/guards.Guards): the output guard, applied as the text grows
        (agent/streaming.RowText), so what stream_cb receives is the guarded reply.
        `continuation`: the text is what the tokens add after the prompt (decoded in context, a
        SentencePiece word piece keeps its leading space); False for a chat reply, whose text is
        its tokens' own decode.
        """
        tok = self.tokenizer
        if self.cfg.kind == "encoder_decoder":
            # sources longer than max_len: an error in _start, or cut here keeping their EOS
            src_len = self.cfg.max_len if self.overflow == "truncate_left" else None
            if src is None:
                src, prompts = prompts, [[self.bos_id]] * len(prompts)
            src = [framing.source(tok, x, src_len) if isinstance(x, str) else list(x)
                   for x in src]
            ids = [[self.bos_id, *tok.encode(p)] if isinstance(p, str) else list(p)
                   for p in prompts]
        else:
            ids = [framing.prompt(tok, p) if isinstance(p, str) else list(p) for p in prompts]
        streaming = bool(stream_cb or [s for s in stop if s] or guards is not None)
        rows = [RowText(tok, m, stop, incremental=streaming, prefix=prefix, guards=guards,
                        context=row_ids if continuation else ())
                for m, row_ids in zip(_per_row(max_new_tokens, len(ids)), ids, strict=True)]
        stop_rows = np.zeros((len(ids),), bool)
        it = self.iterate(ids, max_new_tokens=max_new_tokens, method=method, seed=seed,
                          chunk=chunk if streaming else 0, src=src, stop_rows=stop_rows,
                          stop_ids=stop_ids)
        lens: list[int] = []
        for new, _, info in it:
            lens = info["lens"]
            for i, row in enumerate(rows):
                delta = row.feed(new[i], info["stop"])
                stop_rows[i] = row.finish is not None  # a stop string ends the row on device
                if stream_cb and delta:
                    stream_cb(i, delta)
            if all(row.finish for row in rows):
                it.close()
                break
        results = []
        for i, row in enumerate(rows):
            row.prompt_tokens = lens[i]
            gen, rest = row.close()
            if stream_cb and rest:
                stream_cb(i, rest)
            results.append(gen)
        return results


def _per_row(max_new_tokens: int | Sequence[int], n: int) -> list[int]:
    if isinstance(max_new_tokens, (int, np.integer)):
        return [int(max_new_tokens)] * n
    rows = [int(m) for m in max_new_tokens]
    if len(rows) != n:
        raise ValueError(f"max_new_tokens has {len(rows)} budgets for {n} prompts")
    return rows


def sample(workdir: str, prompts: Sequence[str], *, max_new_tokens: int = 64,
           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
           checkpoint: str | int = "latest") -> list[Generation]:
    """`solo sample`: continuations of text prompts from a workdir's checkpoint (prompts longer
    than the context keep their newest tokens)."""
    from solo.train.inference import load

    loaded = load(workdir, checkpoint)
    sampler = Sampler(loaded.model, loaded.params, loaded.tokenizer, overflow="truncate_left")
    return sampler.generate(list(prompts), max_new_tokens=max_new_tokens, seed=seed,
                            method=Sampling(temperature, top_k, top_p))
