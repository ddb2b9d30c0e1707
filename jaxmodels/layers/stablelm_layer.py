"""The StableLM decoder layer: LayerNorm, GQA attention, MLP; sequential or parallel residual."""

from __future__ import annotations

from flax import nnx

from jaxmodels import sharding
from jaxmodels.config import StableLmConfig
from jaxmodels.layers.attention import StableLmAttention
from jaxmodels.layers.mlp import MLP
from jaxmodels.layers.norms import LayerNorm


class StableLmLayer(nnx.Module):
    def __init__(self, cfg: StableLmConfig, *, dtype, rngs: nnx.Rngs, std: float):
        self.parallel = cfg.use_parallel_residual
        self.self_attn = StableLmAttention(cfg, dtype=dtype, rngs=rngs, std=std)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, act=cfg.hidden_act, dtype=dtype, rngs=rngs, std=std)
        self.input_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.post_attention_layernorm = (
            None if self.parallel else LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype))

    def __call__(self, x, inputs, cache=None):
        """x [b, s, hidden]; inputs: jaxmodels.inputs.Inputs (with rope tables); cache: this layer's view of the
        stack's cache or None. Returns (x, cache, None): no router statistics."""
        x = sharding.constrain(x, sharding.ACTIVATION_AXES, inputs.options)  # block boundary: [batch, seq, hidden]
        h = self.input_layernorm(x)
        attn, cache = self.self_attn(h, inputs.cos, inputs.sin, inputs, cache)
        if self.parallel:
            return x + attn + self.mlp(h), cache, None
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), cache, None
