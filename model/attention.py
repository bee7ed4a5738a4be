"""Attention by backend: one choice per run from `model.attention` and the platform.

Shapes: B batch, L query length, S key length, H heads, G kv heads, K head width.

    einsum   solo's own (`layers.attention_core`): tuned for XLA:CPU, float32 scores and mask bias
    xla      `jax.nn.dot_product_attention(implementation='xla')`: the reference on any backend
    cudnn    the same call with implementation='cudnn' (GPU, bfloat16/float16): cuDNN's fused
             flash attention; packed segments go in as its mask (a [B,1,L,S] bias), causal as
             its causal mask type (the masked-out half is skipped). jax 0.10's public call
             takes only one length per row (no packing); cuDNN's packed layout (segment
             offsets) sits behind a private API and needs Hopper, so the mask carries them
    splash   Pallas splash attention (TPU; `interpret=True` runs it anywhere, slowly): segment
             ids and the causal mask handled block-sparsely in the kernel, GQA as one MQA kernel
             per kv head; under a mesh it runs in `jax.shard_map` over batch and heads
    auto     einsum on CPU, cudnn on GPU, splash on TPU, each falling back to xla (with the
             reason logged once) where its constraints fail

Packed documents never leak on any path: a query of segment s > 0 sees only keys of segment s
(and, causal, at or before it). Padding queries (segment 0) attend to other padding (fused
paths) or to nothing (einsum/xla: a uniform average); their outputs carry zero loss weight.
Decoding (a KV cache) always runs `DecodeCache.attend`.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn", "splash")
log = logging.getLogger("solo.attention")
_SPLASH_BLOCK = 128  # splash tiles queries and keys by 128 (min of its default block sizes)


def resolve(choice: str, *, seq_len: int, head_dim: int, dtype, segments: bool = True,
            backend: str | None = None) -> tuple[str, str]:
    """(implementation, why) for a config choice on this backend and these shapes."""
    backend = backend or jax.default_backend()
    want = {"cpu": "einsum", "gpu": "cudnn", "tpu": "splash"}.get(backend, "xla") \
        if choice == "auto" else choice
    why = "model.attention=" + choice + ("" if choice != "auto" else f" on {backend}")
    problem = None
    if not segments and want in ("cudnn", "splash"):
        problem = "cross-attention has no segment ids"
    elif want == "cudnn":
        if backend != "gpu":
            problem = f"cudnn needs a GPU (backend is {backend})"
        elif jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
            problem = f"cudnn needs bfloat16/float16 compute (model.dtype is {jnp.dtype(dtype)})"
        elif head_dim % 8 or head_dim > 128:
            problem = f"cudnn needs head_dim a multiple of 8 and <= 128 (got {head_dim})"
        elif seq_len % 2:
            problem = f"cudnn with a mask needs an even sequence length (got {seq_len})"
    elif want == "splash":
        if seq_len % _SPLASH_BLOCK:
            problem = f"splash needs the sequence length a multiple of {_SPLASH_BLOCK} " \
                      f"(got {seq_len})"
        elif backend != "tpu" and choice == "auto":
            problem = "splash runs on TPU"
    if problem is None:  # an explicit splash off TPU runs in Pallas' interpret mode (tests)
        return want, why + (" (interpret mode off TPU)" if want == "splash" and backend != "tpu"
                            else "")
    return "xla", f"{why}: {problem}; using xla"


@functools.cache
def _log_once(impl: str, why: str) -> None:
    log.info("attention: %s (%s)", impl, why)


def describe(choice: str, seq_len: int, head_dim: int, dtype) -> str:
    """One line naming the training attention path of a run (logged at start)."""
    impl, why = resolve(choice, seq_len=seq_len, head_dim=head_dim, dtype=dtype)
    return f"attention: {impl} ({why})"


def attend(choice: str, q_BLHK, k_BSGK, v_BSGK, mask_BLS, segment_ids_BL=None, *,
           causal: bool = False) -> jax.Array:
    """softmax(q k^T / sqrt(K) + mask) v on the path `choice` resolves to; [B,L,H,K] in q's
    dtype. mask_BLS (bool) is what einsum/xla use; segment_ids_BL (self-attention: L == S)
    and `causal` are what the fused kernels use: both must describe the same mask."""
    impl, why = resolve(choice, seq_len=q_BLHK.shape[1], head_dim=q_BLHK.shape[-1],
                        dtype=q_BLHK.dtype, segments=segment_ids_BL is not None)
    _log_once(impl, why)
    if impl == "einsum":
        from solo.model import layers  # looked up at call time (benchmarks patch it)

        return layers.attention_core(q_BLHK, k_BSGK, v_BSGK, mask_BLS, causal=causal)
    if impl == "xla":
        k, v = k_BSGK.astype(q_BLHK.dtype), v_BSGK.astype(q_BLHK.dtype)
        return jax.nn.dot_product_attention(q_BLHK, k, v, mask=mask_BLS[:, None],
                                            implementation="xla")
    if impl == "cudnn":
        return cudnn_attention(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, causal=causal)
    return splash_attention(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, causal=causal,
                            interpret=jax.default_backend() != "tpu")


def cudnn_attention(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, *, causal: bool) -> jax.Array:
    """cuDNN flash attention; the segment mask as its [B,1,L,L] bias (same segment)."""
    dt = q_BLHK.dtype
    seg = segment_ids_BL
    mask_B1LL = (seg[:, :, None] == seg[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q_BLHK, k_BSGK.astype(dt), v_BSGK.astype(dt),
                                        mask=mask_B1LL, is_causal=causal,
                                        implementation="cudnn")


def splash_attention(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, *, causal: bool,
                     interpret: bool = False) -> jax.Array:
    """Pallas splash attention with segment ids; under `model.sharding.activation_sharding`
    it runs per shard (batch over data/fsdp, heads over tensor) in `jax.shard_map`."""
    from solo.model import sharding

    b, n, h, k = q_BLHK.shape
    g = k_BSGK.shape[2]
    dt = q_BLHK.dtype
    q_BHLK = (q_BLHK * jnp.asarray(k ** -0.5, dt)).transpose(0, 2, 1, 3)
    k_BGLK = k_BSGK.astype(dt).transpose(0, 2, 1, 3)
    v_BGLK = v_BSGK.astype(dt).transpose(0, 2, 1, 3)
    seg = segment_ids_BL.astype(jnp.int32)

    def local(q_bHLK, k_bGLK, v_bGLK, seg_bL):
        from jax.experimental.pallas.ops.tpu import splash_attention as sa

        hl, gl = q_bHLK.shape[1], k_bGLK.shape[1]
        r = hl // gl
        one = sa.CausalMask((n, n)) if causal else sa.FullMask((n, n))
        blk = math.gcd(n, _SPLASH_BLOCK * 4)  # 128, 256 or 512: must divide n (768, 640...)
        sizes = sa.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk,
                              block_q_dkv=blk, block_kv_dkv=blk, block_kv_dkv_compute=blk,
                              block_q_dq=blk, block_kv_dq=blk)
        kernel = sa.make_splash_mqa_single_device(sa.MultiHeadMask([one] * r),
                                                  block_sizes=sizes, interpret=interpret)
        # per row, per kv head: R query heads share one key/value head (MQA kernel)
        q_bGRLK = q_bHLK.reshape(q_bHLK.shape[0], gl, r, n, k)
        per_group = jax.vmap(lambda q, kk, vv, s: kernel(q, kk, vv, segment_ids=s),
                             in_axes=(0, 0, 0, None))
        ids = lambda s: sa.SegmentIds(q=s, kv=s)
        out = jax.vmap(lambda q, kk, vv, s: per_group(q, kk, vv, ids(s)))(
            q_bGRLK, k_bGLK, v_bGLK, seg_bL)
        return out.reshape(q_bHLK.shape)

    active = sharding.active_mesh()
    if active is None:
        out_BHLK = local(q_BHLK, k_BGLK, v_BGLK, seg)
    else:
        from jax.sharding import PartitionSpec as P

        batch = sharding.mesh_axes_for(active, "act_batch", b)
        # heads split by the kv head count (each shard keeps whole GQA groups), never over an
        # axis the batch already took (custom rules could name one for both)
        used = (batch,) if isinstance(batch, str) else (batch or ())
        heads = sharding.mesh_axes_for(active, "act_heads", g, used)
        spec = P(batch, heads, None, None)
        out_BHLK = jax.shard_map(local, mesh=active, in_specs=(spec, spec, spec, P(batch, None)),
                                 out_specs=spec, check_vma=False)(q_BHLK, k_BGLK, v_BGLK, seg)
    return out_BHLK.transpose(0, 2, 1, 3).astype(dt)


def reference(q_BLHK, k_BSGK, v_BSGK, mask_BLS) -> np.ndarray:
    """float64 numpy attention (tests): GQA by repeating kv heads; fully-masked rows -> 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q_BLHK, k_BSGK, v_BSGK))
    r = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, r, axis=2), np.repeat(v, r, axis=2)
    # batched matmuls rather than np.einsum (unoptimised loops): quick at GPT-2's shape too
    s = (q.transpose(0, 2, 1, 3) @ k.transpose(0, 2, 3, 1)) / np.sqrt(q.shape[-1])
    m = np.asarray(mask_BLS)[:, None]
    s = np.where(m, s, -np.inf)
    mx = np.max(s, -1, keepdims=True)
    p = np.where(m, np.exp(s - np.where(np.isfinite(mx), mx, 0)), 0.0)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    return (p @ v.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)


__all__ = ["IMPLEMENTATIONS", "resolve", "describe", "attend", "cudnn_attention",
           "splash_attention", "reference"]
