"""RMSNorm (DeepSeek) and LayerNorm with bias (StableLM), both computed in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.layers.linear import param


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype=jnp.float32, axis_name: str | None = "embed"):
        self.weight = param(None, (dim,), dtype, (axis_name,), init="ones")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        # transformers casts back to the input dtype before the scale; keep that order for bf16 parity.
        return self.weight[...].astype(x.dtype) * xf.astype(x.dtype)


def layer_norm(x: jax.Array, weight: jax.Array | None, bias: jax.Array | None, eps: float) -> jax.Array:
    """LayerNorm over the last axis in float32; weight/bias broadcast against x."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
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
