"""Multi-head Latent Attention (DeepSeek-V2/V3).

Keys and values are compressed into a latent `c_kv` [kv_lora_rank] plus one rotary key `k_pe`
[qk_rope_head_dim] shared by all heads; only those two are ever cached. Two equivalent ways to attend:

* expanded: decompress the latent into per-head K/V with `kv_b_proj` (cheap when queries are many, prefill);
* absorbed: fold `W_UK` into the query and apply `W_UV` after attention, so attention runs over the
  latent directly and past tokens are never decompressed (decode).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.config import DeepseekConfig, DeepseekV3Config
from jaxmodels.layers.attention import dot_product_attention, masked_softmax_parts
from jaxmodels.layers.linear import Linear
from jaxmodels.layers.norms import RMSNorm
from jaxmodels.layers.rope import apply_rope

# transformers builds q_a_layernorm / kv_a_layernorm with the RMSNorm default eps, not rms_norm_eps.
_LATENT_NORM_EPS = 1e-6


class MLAttention(nnx.Module):
    def __init__(self, cfg: DeepseekConfig, *, dtype, rngs: nnx.Rngs, std: float):
        self.cfg = cfg
        h, hid = cfg.num_attention_heads, cfg.hidden_size
        kw = dict(dtype=dtype, rngs=rngs, std=std)
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(hid, h * cfg.qk_head_dim, axes=("heads", "embed"), **kw)
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        else:
            self.q_proj = None
            self.q_a_proj = Linear(hid, cfg.q_lora_rank, axes=("q_lora", "embed"), bias=cfg.attention_bias, **kw)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=_LATENT_NORM_EPS, dtype=dtype, axis_name="q_lora")
            self.q_b_proj = Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, axes=("heads", "q_lora_in"), **kw)
        self.kv_a_proj_with_mqa = Linear(hid, cfg.kv_lora_rank + cfg.qk_rope_head_dim, axes=(None, "embed"),
                                         bias=cfg.attention_bias, **kw)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, eps=_LATENT_NORM_EPS, dtype=dtype, axis_name="kv_lora")
        self.kv_b_proj = Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                                axes=("heads", "kv_lora"), **kw)
        self.o_proj = Linear(h * cfg.v_head_dim, hid, axes=("embed", "heads"), bias=cfg.attention_bias, **kw)

    @property
    def interleaved(self) -> bool:
        # V2's complex-pair rope and V3's rope_interleave=True rotate adjacent pairs.
        return not isinstance(self.cfg, DeepseekV3Config) or self.cfg.rope_interleave

    def project_q(self, x, cos, sin):
        """x [b, s, hidden] -> q_nope [b, s, heads, nope], rotated q_pe [b, s, heads, rope]."""
        cfg = self.cfg
        b, s, _ = x.shape
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(b, s, cfg.num_attention_heads, cfg.qk_head_dim)
        q_nope, q_pe = q[..., :cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]
        return q_nope, apply_rope(q_pe, cos, sin, interleaved=self.interleaved)

    def project_latent(self, x, cos, sin):
        """x [b, s, hidden] -> normed latent c_kv [b, s, kv_lora_rank], rotated k_pe [b, s, rope]."""
        cfg = self.cfg
        ckv = self.kv_a_proj_with_mqa(x)  # [b, s, kv_lora_rank + rope]
        c_kv, k_pe = ckv[..., :cfg.kv_lora_rank], ckv[..., cfg.kv_lora_rank:]
        return self.kv_a_layernorm(c_kv), apply_rope(k_pe, cos, sin, interleaved=self.interleaved)

    def _w_kv_b(self):
        """kv_b_proj weight split per head: W_UK [heads, nope, lora], W_UV [heads, v, lora]. The merged weight
        (LoRA folded in), so absorbed decode equals the expanded forward of an adapted model."""
        cfg = self.cfg
        w = self.kv_b_proj.merged_weight().reshape(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim,
                                               cfg.kv_lora_rank)
        return w[:, :cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim:]

    def attend_expanded(self, q_nope, q_pe, c_kv, k_pe, inputs):
        """Decompresses the latent to per-head K/V. c_kv [b, t, lora], k_pe [b, t, rope]; inputs: Inputs."""
        cfg = self.cfg
        b, s, h, _ = q_nope.shape
        t = c_kv.shape[1]
        kv = self.kv_b_proj(c_kv).reshape(b, t, h, cfg.qk_nope_head_dim + cfg.v_head_dim)
        k_nope, v = kv[..., :cfg.qk_nope_head_dim], kv[..., cfg.qk_nope_head_dim:]  # [b, t, heads, *]
        # The shared rope key joins every head's key, so one dot over [nope | rope] gives both score terms.
        k_pe = jnp.broadcast_to(k_pe[:, :, None, :], (b, t, h, cfg.qk_rope_head_dim))
        q = jnp.concatenate([q_nope, q_pe], axis=-1)  # [b, s, heads, qk_head_dim]
        k = jnp.concatenate([k_nope, k_pe], axis=-1)  # [b, t, heads, qk_head_dim]
        out = dot_product_attention(q, k, v, inputs, scale=cfg.softmax_scale)  # [b, s, heads, v]
        return self.o_proj(out.reshape(b, s, h * cfg.v_head_dim))

    def attend_absorbed(self, q_nope, q_pe, latent, inputs):
        """Attention over the latent itself: W_UK folded into q, W_UV applied after. Same result.
        latent [b, t, lora + rope]: c_kv then k_pe, as the cache keeps them. An XLA path (decode: few
        queries over the cache) over the inputs' dense mask."""
        cfg = self.cfg
        b, s, h, _ = q_nope.shape
        lora = cfg.kv_lora_rank
        mask = inputs.dense_mask(latent.shape[1])  # [b, s, t]
        w_uk, w_uv = (w.astype(q_nope.dtype) for w in self._w_kv_b())
        q_lat = jnp.einsum("bshd,hdc->bshc", q_nope, w_uk)  # [b, s, heads, lora]
        # [q_lat | q_pe] . [c_kv | k_pe] = q_lat . c_kv + q_pe . k_pe: one matmul over the cache's rows.
        q = jnp.concatenate([q_lat, q_pe.astype(q_lat.dtype)], axis=-1)  # [b, s, heads, lora + rope]
        scores = jnp.einsum("bshc,btc->bhst", q, latent) * cfg.softmax_scale  # [b, heads, s, t]
        num, den = masked_softmax_parts(scores, mask)  # [b, heads, s, t], [b, heads, s, 1]
        # Weighted sum over whole rows (the rope columns come along and are dropped): reading the c_kv columns
        # alone would make XLA copy them out of the cache first.
        out_lat = jnp.einsum("bhst,btc->bshc", num.astype(latent.dtype), latent)[..., :lora]
        out_lat = (out_lat / jnp.moveaxis(den, 2, 1)).astype(latent.dtype)  # [b, s, heads, lora]
        out = jnp.einsum("bshc,hvc->bshv", out_lat, w_uv)  # [b, s, heads, v]
        return self.o_proj(out.reshape(b, s, h * cfg.v_head_dim))

    def __call__(self, x, cos, sin, inputs, cache=None):
        """x [b, s, hidden]; cos, sin: rope tables of inputs.positions; inputs: jaxmodels.inputs.Inputs; cache:
        this layer's view of the stack's latent cache or None. Decode steps (inputs.mode == "decode") attend
        over the latent with W_UK / W_UV absorbed; full passes decompress it. Returns ([b, s, hidden], cache)."""
        lora = self.cfg.kv_lora_rank
        with jax.named_scope("mla"):
            q_nope, q_pe = self.project_q(x, cos, sin)
            c_kv, k_pe = self.project_latent(x, cos, sin)
            latent = jnp.concatenate([c_kv, k_pe.astype(c_kv.dtype)], axis=-1)  # [b, s, lora + rope]
            if cache is not None:
                latent, cache = cache.update(latent, inputs)
            if inputs.decoding:
                return self.attend_absorbed(q_nope, q_pe, latent, inputs), cache
            return self.attend_expanded(q_nope, q_pe, latent[..., :lora], latent[..., lora:], inputs), cache
