"""Linear and embedding layers with HF parameter layout and logical axis names.

Weights keep transformers' layout (`weight: [out, in]`) so the converter copies them without
transposes; XLA contracts either dimension at the same speed. Every parameter carries `axes`, the
logical axis names the sharding table maps onto the mesh.
"""

from __future__ import annotations

import functools

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


class LoRAParam(nnx.LoRAParam):
    """A LoRA adapter matrix: its own variable type, so `nnx.split(model, LoRAParam, ...)` selects exactly
    the trainable adapters (it is an nnx.Param too: put it before nnx.Param in a filter list)."""


def lora_delta(lora_a: jax.Array, lora_b: jax.Array, scale: float) -> jax.Array:
    """scale * B @ A in float32: A [..., r, in], B [..., out, r] -> [..., out, in]."""
    return scale * jnp.einsum("...or,...ri->...oi", lora_b.astype(jnp.float32), lora_a.astype(jnp.float32))


class Linear(nnx.Module):
    """y = x @ weight.T + bias, weight [out_features, in_features] as in PyTorch.

    Optionally a LoRA adapter (train/lora.py adds it): lora_a [r, in], lora_b [out, r] (PEFT's layout) and a
    static lora_scale = alpha / r; then y += lora_scale * (x @ A.T) @ B.T. Code that reads the weight
    itself instead of calling the layer (MLA's absorbed decode) must read `merged_weight()`.
    """

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None],
                 bias: bool = False, dtype=jnp.float32, std: float = 0.02, rngs: nnx.Rngs):
        self.weight = param(rngs, (out_features, in_features), dtype, axes, std)
        self.bias = param(rngs, (out_features,), dtype, axes[:1], init="zeros") if bias else None
        # Declared as data (nnx.data) so train/lora.py can put LoRAParams here later.
        self.lora_a: LoRAParam | None = nnx.data(None)
        self.lora_b: LoRAParam | None = nnx.data(None)
        self.lora_scale: float | None = None

    def merged_weight(self) -> jax.Array:
        """weight + lora_scale * lora_b @ lora_a ([out, in], the weight's dtype); the weight without LoRA."""
        w = self.weight[...]
        if self.lora_a is None:
            return w
        return (w.astype(jnp.float32) + lora_delta(self.lora_a[...], self.lora_b[...], self.lora_scale)).astype(w.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        # The weight is cast to the activations' dtype where it is used: float32 master weights, bf16 compute.
        y = jnp.einsum("...i,oi->...o", x, self.weight[...].astype(x.dtype))  # [..., out]
        if self.lora_a is not None:
            # Low-rank path: never materialises B @ A (a full [out, in] matrix) in the forward pass.
            a, b = self.lora_a[...].astype(x.dtype), self.lora_b[...].astype(x.dtype)
            z = jnp.einsum("...i,ri->...r", x, a)  # [..., r]
            y = y + (self.lora_scale * jnp.einsum("...r,or->...o", z, b)).astype(y.dtype)  # [..., out]
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table weight [vocab, hidden]; `attend` is the tied output projection."""

    def __init__(self, vocab_size: int, hidden_size: int, *, dtype=jnp.float32, std: float = 0.02,
                 rngs: nnx.Rngs):
        self.weight = param(rngs, (vocab_size, hidden_size), dtype, ("vocab", "embed"), std)

    def __call__(self, ids: jax.Array, dtype=None, options=None) -> jax.Array:
        """ids [batch, seq] -> [batch, seq, hidden] in `dtype` (default: the table's), the compute dtype every
        later layer follows. On options' mesh no device gathers the whole table (jaxmodels.layers.vocab)."""
        from jaxmodels.layers import vocab
        return vocab.lookup(self.weight[...], ids, dtype or self.weight.dtype, options)

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


@functools.partial(jax.checkpoint, static_argnums=(2,), prevent_cse=False)
def gated(gate: jax.Array, up: jax.Array, act: str) -> jax.Array:
    """act(gate) * up, the gated MLP's hidden. Under differentiation it keeps only gate and up (the two matmul
    outputs) and recomputes the rest in the backward pass, so the activation's output and the product never
    become saved residuals (two [tokens, intermediate] tensors per MLP per layer); the forward is unchanged."""
    return ACTIVATIONS[act](gate) * up
