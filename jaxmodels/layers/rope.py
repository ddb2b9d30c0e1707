"""Rotary position embeddings: the rope types transformers supports for these families.

`rope_tables` turns positions into (cos, sin) of shape [batch, seq, rotary_dim // 2], already
multiplied by the rope type's attention factor. `apply_rope` rotates either the rotate-half layout
(StableLM, DeepSeek-V3 with rope_interleave=False) or adjacent pairs (DeepSeek-V2's complex form and
V3's interleaved layout: the same math). The interleaved form returns the pairs de-interleaved
(evens then odds), as transformers does; queries and keys get the same permutation so their dot
products are unchanged.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.config import RopeConfig


def _yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def static_inv_freq(rope: RopeConfig, head_dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies [rotary_dim // 2] and the cos/sin scaling, for every type but `dynamic`'s growth."""
    dim = int(head_dim * rope.partial_rotary_factor)
    base = rope.rope_theta
    exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
    inv_freq = 1.0 / (base ** exponents)
    scaling = 1.0
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "yarn":
        omax = rope.original_max_position_embeddings or max_position_embeddings
        factor = rope.factor if rope.factor is not None else max_position_embeddings / omax
        if rope.attention_factor is not None:
            scaling = rope.attention_factor
        elif rope.mscale and rope.mscale_all_dim:
            scaling = _yarn_get_mscale(factor, rope.mscale) / _yarn_get_mscale(factor, rope.mscale_all_dim)
        else:
            scaling = _yarn_get_mscale(factor)
        beta_fast = rope.beta_fast or 32
        beta_slow = rope.beta_slow or 1

        def correction_dim(rotations):
            return (dim * math.log(omax / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if rope.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    elif rope.rope_type == "llama3":
        factor, lo, hi = rope.factor, rope.low_freq_factor, rope.high_freq_factor
        old_len = rope.original_max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32), float(scaling)


def rope_tables(rope: RopeConfig, head_dim: int, max_position_embeddings: int,
                positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [batch, seq, rotary_dim // 2] (float32) for integer `positions` [batch, seq]."""
    inv_freq, scaling = static_inv_freq(rope, head_dim, max_position_embeddings)
    inv_freq = jnp.asarray(inv_freq)
    if rope.rope_type == "dynamic":
        # NTK-aware growth once the sequence outgrows max_position_embeddings (transformers recomputes
        # the base from the longest position in the call).
        dim = int(head_dim * rope.partial_rotary_factor)
        seq_len = jnp.maximum(jnp.max(positions) + 1, max_position_embeddings).astype(jnp.float32)
        base = rope.rope_theta * ((rope.factor * seq_len / max_position_embeddings) - (rope.factor - 1)) ** (
            dim / (dim - 2))
        inv_freq = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, rotary_dim // 2]
    return jnp.cos(freqs) * scaling, jnp.sin(freqs) * scaling


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, *, interleaved: bool) -> jax.Array:
    """Rotates x [batch, seq, heads, rotary_dim] (or [batch, seq, rotary_dim]) by cos/sin [batch, seq, rotary_dim//2]."""
    if x.ndim == 4:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.astype(jnp.float32)
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
