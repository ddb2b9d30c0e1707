"""Softmax attention shared by MLA and StableLM, plus StableLM's GQA attention block."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.config import StableLmConfig
from jaxmodels.layers.linear import Linear
from jaxmodels.layers.norms import PerHeadLayerNorm
from jaxmodels.layers.rope import apply_rope


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis in float32. scores [batch, ..., q, k]; mask [batch, q, k] (True = attend).

    Masked logits get the dtype's lowest finite value (as transformers does) so a fully masked row —
    a left-padding query — gives a uniform row instead of NaNs.
    """
    scores = scores.astype(jnp.float32)
    extra = scores.ndim - mask.ndim
    mask = mask.reshape(mask.shape[:1] + (1,) * extra + mask.shape[1:])
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


class StableLmAttention(nnx.Module):
    """Multi-head attention with GQA, optional qkv bias, per-head q/k LayerNorm and partial rotary."""

    def __init__(self, cfg: StableLmConfig, *, dtype, rngs: nnx.Rngs, std: float):
        self.cfg = cfg
        h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        hid = cfg.hidden_size
        kw = dict(dtype=dtype, rngs=rngs, std=std)
        self.q_proj = Linear(hid, h * d, axes=("heads", "embed"), bias=cfg.use_qkv_bias, **kw)
        self.k_proj = Linear(hid, kvh * d, axes=("kv_heads", "embed"), bias=cfg.use_qkv_bias, **kw)
        self.v_proj = Linear(hid, kvh * d, axes=("kv_heads", "embed"), bias=cfg.use_qkv_bias, **kw)
        self.o_proj = Linear(h * d, hid, axes=("embed", "heads"), bias=False, **kw)
        if cfg.qk_layernorm:
            self.q_layernorm = PerHeadLayerNorm(h, d, eps=cfg.layer_norm_eps, dtype=dtype, heads_axis="heads")
            self.k_layernorm = PerHeadLayerNorm(kvh, d, eps=cfg.layer_norm_eps, dtype=dtype, heads_axis="kv_heads")
        else:
            self.q_layernorm = self.k_layernorm = None

    def project_qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
        """Rotated q [b, s, heads, d], k and v [b, s, kv_heads, d]."""
        cfg = self.cfg
        b, s, _ = x.shape
        d, r = cfg.head_dim, cfg.rotary_dim
        q = self.q_proj(x).reshape(b, s, cfg.num_attention_heads, d)
        k = self.k_proj(x).reshape(b, s, cfg.num_key_value_heads, d)
        v = self.v_proj(x).reshape(b, s, cfg.num_key_value_heads, d)
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        # Rotary on the first `rotary_dim` of each head only (partial_rotary_factor).
        q = jnp.concatenate([apply_rope(q[..., :r], cos, sin, interleaved=False), q[..., r:]], axis=-1)
        k = jnp.concatenate([apply_rope(k[..., :r], cos, sin, interleaved=False), k[..., r:]], axis=-1)
        return q, k, v

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        """q [b, s, heads, d]; k, v [b, t, kv_heads, d]; mask [b, s, t] -> [b, s, hidden]."""
        cfg = self.cfg
        b, s, h, d = q.shape
        kvh = cfg.num_key_value_heads
        q = q.reshape(b, s, kvh, h // kvh, d)  # [b, s, kv_heads, group, d]
        scores = jnp.einsum("bskgd,btkd->bkgst", q, k) * (d ** -0.5)  # [b, kv_heads, group, s, t]
        probs = masked_softmax(scores, mask).astype(v.dtype)
        out = jnp.einsum("bkgst,btkd->bskgd", probs, v)  # [b, s, kv_heads, group, d]
        return self.o_proj(out.reshape(b, s, h * d))

    def __call__(self, x, cos, sin, mask, cache=None):
        with jax.named_scope("stablelm_attention"):
            q, k, v = self.project_qkv(x, cos, sin)
            if cache is not None:
                k, v, cache = cache.update(k, v)
            return self.attend(q, k, v, mask), cache
