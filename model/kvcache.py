"""The decoder's KV cache: a typed pytree, its layout, and attention over it.

Shapes: B batch, T new tokens, S cache slots, G kv heads, R = H/G query heads per kv head,
K head width, N = B*G (batch and kv heads merged).

Layout, chosen for decoding speed and used by every model option alike:
- one (k, v) pair per layer in a tuple, not one stacked [layers, ...] array, so a step updates each
  layer's cache in place instead of copying a stacked one through a layer scan;
- k is [N, S, K] and v is [N, K, S]: both attention matmuls of a step are plain batched matvecs
  (contracting K, then S, on the minor axis), so XLA never transposes (copies) the cache, and the
  merged N axis keeps the in-place update and the dot on the same buffer;
- rows are left-padded: every row writes the same slot each step (one dynamic_update_slice, no
  per-row scatter). Row b's real tokens start at slot `offset[b]`; slots before it are masked and
  its positions count from there.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
_NEG_INF = -1e30


@flax.struct.dataclass
class LayerCache:
    k: jax.Array  # [N, S, K]
    v: jax.Array  # [N, K, S]

    def write(self, k_BTGK: jax.Array, v_BTGK: jax.Array, slot: jax.Array) -> LayerCache:
        """Stores T new keys/values of every row at slots [slot, slot+T)."""
        b, t, g, k = k_BTGK.shape
        k_NTK = k_BTGK.transpose(0, 2, 1, 3).reshape(b * g, t, k)
        v_NKT = v_BTGK.transpose(0, 2, 3, 1).reshape(b * g, k, t)
        return LayerCache(k=lax.dynamic_update_slice(self.k, k_NTK.astype(self.k.dtype),
                                                     (0, slot, 0)),
                          v=lax.dynamic_update_slice(self.v, v_NKT.astype(self.v.dtype),
                                                     (0, 0, slot)))

    def attend(self, q_BTHK: jax.Array, mask_BTS: jax.Array) -> jax.Array:
        """softmax(q k^T / sqrt(K) masked) v over the cache slots, float32 scores; [B,T,H,K]."""
        b, t, h, k = q_BTHK.shape
        n, s = self.k.shape[0], self.k.shape[1]
        g = n // b
        r = h // g
        dt = q_BTHK.dtype
        mask_NQS = jnp.broadcast_to(mask_BTS[:, None, None], (b, g, r, t, s)).reshape(n, r * t, s)
        q_NQK = q_BTHK.reshape(b, t, g, r, k).transpose(0, 2, 3, 1, 4).reshape(n, r * t, k)
        s_NQS = jnp.einsum("NQK,NSK->NQS", q_NQK, self.k.astype(dt), preferred_element_type=F32)
        s_NQS = jnp.where(mask_NQS, s_NQS * (k ** -0.5), _NEG_INF)
        p_NQS = jax.nn.softmax(s_NQS, axis=-1).astype(dt)
        o_NQK = jnp.einsum("NQS,NKS->NQK", p_NQS, self.v.astype(dt))
        return o_NQK.reshape(b, g, r, t, k).transpose(0, 3, 1, 2, 4).reshape(b, t, h, k)


@flax.struct.dataclass
class DecodeCache:
    """The decoder stack's cache for `Transformer.decode` (see the module docstring).

    layers: one LayerCache per decoder layer. slot: int32 [], the next slot every row writes
    (tokens so far, padding included). offset: int32 [B], row b's first real slot.
    """

    layers: tuple[LayerCache, ...]
    slot: jax.Array
    offset: jax.Array

    @classmethod
    def init(cls, num_layers: int, num_kv_heads: int, head_dim: int, batch: int, slots: int,
             offset_B: jax.Array | None = None, dtype=F32) -> DecodeCache:
        """Empty cache of `slots` slots; offset_B (default 0) = left padding of each row."""
        n = batch * num_kv_heads
        layers = tuple(LayerCache(k=jnp.zeros((n, slots, head_dim), dtype),
                                  v=jnp.zeros((n, head_dim, slots), dtype))
                       for _ in range(num_layers))
        offset = (jnp.zeros((batch,), jnp.int32) if offset_B is None
                  else jnp.asarray(offset_B, jnp.int32))
        return cls(layers=layers, slot=jnp.zeros((), jnp.int32), offset=offset)

    @property
    def slots(self) -> int:
        return self.layers[0].k.shape[1]

    def grow(self, slots: int) -> DecodeCache:
        """The same cache with `slots` slots (the new ones empty and masked).

        A sampler can start with room for the prompt and a first stretch of steps and grow the
        cache between stretches: attention reads only the allocated slots. (A slice of a larger
        cache is no substitute: the dot would copy it every step.)"""
        def pad(x, axis):
            widths = [(0, 0)] * x.ndim
            widths[axis] = (0, slots - x.shape[axis])
            return jnp.pad(x, widths)
        return self.replace(layers=tuple(LayerCache(k=pad(c.k, 1), v=pad(c.v, 2))
                                         for c in self.layers))

    def positions(self, t: int) -> jax.Array:
        """[B,T] positions of the next t tokens (padding slots clamp to 0; they are masked)."""
        return jnp.maximum(self.slot + jnp.arange(t, dtype=jnp.int32)[None, :]
                           - self.offset[:, None], 0)

    def mask(self, t: int) -> jax.Array:
        """[B,T,S] bool: token t of row b sees slots offset[b]..slot+t."""
        s_S = jnp.arange(self.slots)
        q_T = self.slot + jnp.arange(t)
        return ((s_S[None, None, :] <= q_T[None, :, None])
                & (s_S[None, None, :] >= self.offset[:, None, None]))
