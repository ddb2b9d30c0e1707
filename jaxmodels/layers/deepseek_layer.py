"""DeepSeek-V2/V3 decoder layers: MLA + (dense MLP or MoE), and the multi-token-prediction (MTP) layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels import sharding
from jaxmodels.config import DeepseekConfig
from jaxmodels.layers.linear import Linear
from jaxmodels.layers.mla import MLAttention
from jaxmodels.layers.mlp import MLP
from jaxmodels.layers.moe import MoE
from jaxmodels.layers.norms import RMSNorm


class DeepseekLayer(nnx.Module):
    def __init__(self, cfg: DeepseekConfig, *, moe: bool, dtype, rngs: nnx.Rngs, std: float):
        self.self_attn = MLAttention(cfg, dtype=dtype, rngs=rngs, std=std)
        if moe:
            self.mlp = MoE(cfg, dtype=dtype, rngs=rngs, std=std)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, act=cfg.hidden_act,
                           bias=getattr(cfg, "mlp_bias", False), dtype=dtype, rngs=rngs, std=std)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)

    def __call__(self, x, inputs, cache=None):
        """x [b, s, hidden]; inputs: jaxmodels.inputs.Inputs (with rope tables); cache: this layer's view of
        the stack's cache or None. Returns (x, cache, router stats {"load", "score"} [b, experts] or None for a
        dense layer)."""
        x = sharding.constrain(x, sharding.ACTIVATION_AXES, inputs.options)  # block boundary: [batch, seq, hidden]
        h, cache = self.self_attn(self.input_layernorm(x), inputs.cos, inputs.sin, inputs, cache)
        x = x + h
        stats = None
        if isinstance(self.mlp, MoE):
            h, stats = self.mlp(self.post_attention_layernorm(x), inputs)
        else:
            h = self.mlp(self.post_attention_layernorm(x))
        return x + h, cache, stats


class MTPLayer(DeepseekLayer):
    """One DeepSeek-V3 multi-token-prediction depth (jaxmodels.layers.mtp explains the forward):
    eh_proj([enorm(emb) ; hnorm(h)]) -> a decoder layer -> shared_head.norm. The embedding and the output
    head are the main model's (shared)."""

    def __init__(self, cfg: DeepseekConfig, *, dtype, rngs: nnx.Rngs, std: float):
        # MTP layers sit after the main ones (index >= num_hidden_layers): MoE whenever the model has experts.
        super().__init__(cfg, moe=cfg.is_moe and cfg.num_hidden_layers >= cfg.first_k_dense_replace, dtype=dtype,
                         rngs=rngs, std=std)
        self.enorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.hnorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size, axes=("embed", None), dtype=dtype, rngs=rngs,
                              std=std)
        self.shared_head = _SharedHeadNorm(cfg, dtype)

    def __call__(self, x, inputs, cache=None, *, emb):
        """x [b, s, hidden]: the previous stage's normed output at index i; emb [b, s, hidden]: the embedding
        of token i + depth. Returns (normed output [b, s, hidden] — what the head and the next depth read,
        updated cache, router stats or None)."""
        with jax.named_scope("mtp_proj"):
            h = self.eh_proj(jnp.concatenate([self.enorm(emb), self.hnorm(x)], axis=-1))  # [b, s, hidden]
        h, cache, stats = super().__call__(h, inputs, cache)
        return self.shared_head.norm(h), cache, stats


class _SharedHeadNorm(nnx.Module):
    """`shared_head.norm`; `shared_head.head` is the main lm_head (shared, see jaxmodels.layers.mtp)."""

    def __init__(self, cfg: DeepseekConfig, dtype):
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
