"""RMSNorm (DeepSeek) and LayerNorm with bias (StableLM), both computed in float32.

Under differentiation a norm keeps only its input (bf16 in training) and recomputes its float32 internals in
the backward pass (`jax.checkpoint`), as torch's kernels keep the input and two per-row statistics: saving
the float32 intermediates costs several float32 [batch, seq, hidden] tensors per norm per layer (memory, and
a copy each into the layer scan's stacked residuals). The forward pass is unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.layers.linear import param


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype=jnp.float32, axis_name: str | None = "embed"):
        self.weight = param(None, (dim,), dtype, (axis_name,), init="ones")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


@functools.partial(jax.checkpoint, static_argnums=(2,), prevent_cse=False)
def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    # transformers casts back to the input dtype before the scale; keep that order for bf16 parity.
    return weight.astype(x.dtype) * xf.astype(x.dtype)


@functools.partial(jax.checkpoint, static_argnums=(3,), prevent_cse=False)
def layer_norm(x: jax.Array, weight: jax.Array | None, bias: jax.Array | None, eps: float) -> jax.Array:
    """LayerNorm over the last axis in float32; weight/bias broadcast against x.

    The variance is E[x^2] - E[x]^2 (flax's LayerNorm default too): both means come from one pass over x, one
    reduction kernel instead of two dependent ones (a decode layer of StableLM launches 2 kernels fewer,
    benchmarks/count_kernels.py). In float32 this matches transformers to ~1e-7 on normalised activations."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.maximum(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) - jnp.square(mean), 0.0)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, bias: bool = True, dtype=jnp.float32):
        self.weight = param(None, (dim,), dtype, ("embed",), init="ones")
        self.bias = param(None, (dim,), dtype, ("embed",), init="zeros") if bias else None
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.weight[...], None if self.bias is None else self.bias[...], self.eps)


class PerHeadLayerNorm(nnx.Module):
    """StableLM's q/k LayerNorm: one LayerNorm (no bias) per head, weight [heads, head_dim]."""

    def __init__(self, num_heads: int, head_dim: int, *, eps: float, dtype=jnp.float32, heads_axis="heads"):
        self.weight = param(None, (num_heads, head_dim), dtype, (heads_axis, "head_dim"), init="ones")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:  # x: [batch, seq, heads, head_dim]
        return layer_norm(x, self.weight[...], None, self.eps)
