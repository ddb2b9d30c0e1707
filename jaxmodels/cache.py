"""Static KV caches: preallocated once per `generate` call, stacked by layer, updated in place.

A cache holds every layer of one layer stack in a leading `layers` axis, exactly like the stack's
parameters. It travels through the layer loop as part of the *carry* (not as scanned-over xs/ys), so
each layer writes only its new tokens into the big buffer with `dynamic_update_slice` and XLA keeps
one buffer for the whole decode loop instead of re-stacking a copy per step. The layer a cache
object addresses is `layer` (`LayerStack` sets it, and with a cache its loop counts layers with it). Where the
new tokens go and what a layer reads back are the forward inputs' (`jaxmodels.inputs.Inputs`): `cache_index`,
the slot of the first new token (a scalar, the same for every row, as prompts are left-padded to one length, or
one slot per row [batch] in speculative decoding, where rows advance by different amounts), the mode and
`read_len`.

* `MLACache` (DeepSeek-V2/V3) holds only the normed latent `c_kv` [kv_lora_rank] and the rotated
  shared rope key `k_pe` [qk_rope_head_dim] per token per layer, side by side in one row; per-head K/V are
  never stored.
* `KVCache` (StableLM) holds rotated K and V per KV head, side by side in one buffer.

`update(new..., inputs)` writes the new entries at `inputs.cache_index` and returns what the layer attends
to: the cache's first `inputs.read_len` slots (decode; None = all of them), or in prefill mode (an empty cache)
just the new entries themselves. `read_len` is static: the decode loop runs in phases of growing read lengths
so a step reads only about the filled part of a long cache (`jaxmodels.generate.read_lengths`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxmodels.config import BaseConfig, DeepseekConfig, StableLmConfig


def _write(buf: jax.Array, new: jax.Array, layer: jax.Array, index: jax.Array) -> jax.Array:
    """buf [layers, b, T, ...] <- new [b, s, ...] at (layer, :, index:index+s); index a scalar (every row) or
    [b] (row r at index[r]: speculative decoding, where rows advance by different amounts)."""
    zero = jnp.zeros((), jnp.int32)
    new = new.astype(buf.dtype)
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice(buf, new[None], (layer, zero, index) + (zero,) * (buf.ndim - 3))

    def row(buf_r, new_r, i):  # buf_r [layers, T, ...], new_r [s, ...]
        return jax.lax.dynamic_update_slice(buf_r, new_r[None], (layer, i) + (zero,) * (buf_r.ndim - 2))

    return jax.vmap(row, in_axes=(1, 0, 0), out_axes=1)(buf, new, index)


def _read(buf: jax.Array, layer: jax.Array, length: int | None = None) -> jax.Array:
    """One layer's first `length` slots (None: all T) [b, length, ...] of buf [layers, b, T, ...]."""
    zero = jnp.zeros((), jnp.int32)
    sizes = (1, buf.shape[1], buf.shape[2] if length is None else length) + buf.shape[3:]
    return jax.lax.dynamic_slice(buf, (layer,) + (zero,) * (buf.ndim - 1), sizes)[0]


class _LayerStackedCache:
    """What both caches share: write new entries at (layer, index), read a layer back, select a layer."""

    def _update(self, inputs, **new: jax.Array):
        index = inputs.cache_index
        written = self.replace(**{n: _write(getattr(self, n), v, self.layer, index) for n, v in new.items()})
        if inputs.mode == "prefill":  # an empty cache: attend to the new entries themselves
            return (*new.values(), written)
        return (*(_read(getattr(written, n), self.layer, inputs.read_len) for n in new), written)

    def at_layer(self, layer):
        return self.replace(layer=jnp.asarray(layer, jnp.int32))


@struct.dataclass
class MLACache(_LayerStackedCache):
    """latent [layers, batch, T, kv_lora_rank + qk_rope_head_dim]: the normed c_kv, then the rotated k_pe.

    One buffer (as FlashMLA and vLLM keep it): a step writes a token with one in-place update, and the
    absorbed decode scores a query against c_kv and k_pe with one matmul over the whole row."""

    latent: jax.Array
    layer: jax.Array  # int32 scalar: the layer of this stack the next update writes

    def update(self, latent: jax.Array, inputs):
        """latent [b, s, lora + rope] (c_kv | k_pe) -> (latent rows to attend to [b, t, lora + rope], updated cache)."""
        return self._update(inputs, latent=latent)

    @property
    def length(self) -> int:
        return self.latent.shape[2]


@struct.dataclass
class KVCache(_LayerStackedCache):
    """kv [layers, batch, T, 2, kv_heads, head_dim]: keys (already rotated) at [..., 0, :, :], values at 1.

    One buffer, so a step writes a token's key and value with one in-place update (one kernel per layer on
    a GPU, not two: benchmarks/count_kernels.py)."""

    kv: jax.Array
    layer: jax.Array

    def update(self, k: jax.Array, v: jax.Array, inputs):
        """k, v [b, s, kv_heads, d] -> (keys to attend to, values, updated cache)."""
        kv, cache = self._update(inputs, kv=jnp.stack([k, v], axis=2))  # [b, t, 2, kv_heads, d]
        return kv[:, :, 0], kv[:, :, 1], cache

    @property
    def length(self) -> int:
        return self.kv.shape[2]


def cache_shapes(cfg: BaseConfig, num_layers: int, batch: int, length: int) -> dict[str, tuple[int, ...]]:
    """Shapes of one stack's cache buffers."""
    if isinstance(cfg, DeepseekConfig):
        return {"latent": (num_layers, batch, length, cfg.kv_lora_rank + cfg.qk_rope_head_dim)}
    if isinstance(cfg, StableLmConfig):
        return {"kv": (num_layers, batch, length, 2, cfg.num_key_value_heads, cfg.head_dim)}
    raise TypeError(f"no cache layout for {type(cfg).__name__}")


def init_cache(cfg: BaseConfig, stack_sizes: dict[str, int], batch: int, length: int, dtype) -> dict[str, Any]:
    """Zeroed caches {stack name: cache} for `stack_sizes` {stack name: number of layers}."""
    cls = MLACache if isinstance(cfg, DeepseekConfig) else KVCache
    zero = jnp.zeros((), jnp.int32)
    out = {}
    for name, n in stack_sizes.items():
        bufs = {k: jnp.zeros(s, dtype) for k, s in cache_shapes(cfg, n, batch, length).items()}
        out[name] = cls(**bufs, layer=zero)
    return out


def bytes_per_token(cfg: BaseConfig, dtype=jnp.bfloat16) -> int:
    """Cache bytes one token costs across all layers."""
    itemsize = jnp.dtype(dtype).itemsize
    per_layer = sum(math.prod(s[3:]) for s in cache_shapes(cfg, 1, 1, 1).values())
    return per_layer * itemsize * cfg.num_hidden_layers
