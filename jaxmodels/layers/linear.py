"""Linear and embedding layers with HF parameter layout and logical axis names.

Weights keep transformers' layout (`weight: [out, in]`) so the converter copies them without
transposes; XLA contracts either dimension at the same speed. Every parameter carries `axes`, the
logical axis names the sharding table maps onto the mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs | None, shape, dtype, axes, std: float = 0.02, init: str = "normal") -> nnx.Param:
    """A parameter with logical `axes`; initialised normal(std), to ones or to zeros."""
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, axes=tuple(axes))


class Linear(nnx.Module):
    """y = x @ weight.T + bias, weight [out_features, in_features] as in PyTorch."""

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None],
                 bias: bool = False, dtype=jnp.float32, std: float = 0.02, rngs: nnx.Rngs):
        self.weight = param(rngs, (out_features, in_features), dtype, axes, std)
        self.bias = param(rngs, (out_features,), dtype, axes[:1], init="zeros") if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        # The weight is cast to the activations' dtype where it is used: float32 master weights, bf16 compute.
        y = jnp.einsum("...i,oi->...o", x, self.weight[...].astype(x.dtype))  # [..., out]
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table weight [vocab, hidden]; `attend` is the tied output projection."""

    def __init__(self, vocab_size: int, hidden_size: int, *, dtype=jnp.float32, std: float = 0.02,
                 rngs: nnx.Rngs):
        self.weight = param(rngs, (vocab_size, hidden_size), dtype, ("vocab", "embed"), std)

    def __call__(self, ids: jax.Array, dtype=None) -> jax.Array:
        """ids [batch, seq] -> [batch, seq, hidden] in `dtype` (default: the table's), the compute dtype every
        later layer follows."""
        return jnp.take(self.weight[...], ids, axis=0).astype(dtype or self.weight.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("bsd,vd->bsv", x, self.weight[...].astype(x.dtype))  # [batch, seq, vocab]


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}
