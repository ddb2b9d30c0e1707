"""DeepSeekMoE: routed experts chosen by a top-k router, plus always-on shared experts.

Routers (transformers' semantics):
* V2 `greedy`: softmax scores, top-k.
* V2 `group_limited_greedy`: softmax scores; keep the `topk_group` groups with the highest max score.
* V3 `noaux_tc`: sigmoid scores; `e_score_correction_bias` is added for the *choice* only; groups ranked
  by the sum of their top-2 biased scores; weights are the unbiased scores, renormalised if
  `norm_topk_prob`.
All then scale by `routed_scaling_factor`.

Compute is dropless: token-slots are sorted by expert and run through one grouped matmul
(`jax.lax.ragged_dot`) per projection, then unsorted and combined with the routing weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.config import DeepseekConfig
from jaxmodels.layers.linear import ACTIVATIONS, param
from jaxmodels.layers.mlp import MLP


class Buffer(nnx.Variable):
    """Checkpoint state that is not trained by gradients (V3's e_score_correction_bias)."""


def route(cfg: DeepseekConfig, logits: jax.Array, bias: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Router logits [tokens, experts] (float32) -> (weights [tokens, k] float32, expert ids [tokens, k])."""
    k, e = cfg.num_experts_per_tok, cfg.n_routed_experts
    if cfg.topk_method == "noaux_tc":
        scores = jax.nn.sigmoid(logits)
        choice = scores + bias.astype(jnp.float32)
        grouped = choice.reshape(-1, cfg.n_group, e // cfg.n_group)
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [tokens, n_group]
        choice = _keep_top_groups(choice, group_scores, cfg, fill=-jnp.inf)
        _, ids = jax.lax.top_k(choice, k)
        weights = jnp.take_along_axis(scores, ids, axis=-1)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    else:
        scores = jax.nn.softmax(logits, axis=-1)
        if cfg.topk_method == "group_limited_greedy":
            group_scores = scores.reshape(-1, cfg.n_group, e // cfg.n_group).max(-1)  # [tokens, n_group]
            scores = _keep_top_groups(scores, group_scores, cfg, fill=0.0)
        weights, ids = jax.lax.top_k(scores, k)
        # transformers' V2 router does not renormalise (norm_topk_prob is kept for config compatibility).
    return weights * cfg.routed_scaling_factor, ids


def _keep_top_groups(scores, group_scores, cfg: DeepseekConfig, fill):
    """Replaces the scores of experts outside the `topk_group` best groups by `fill`."""
    _, top_groups = jax.lax.top_k(group_scores, cfg.topk_group)  # [tokens, topk_group]
    group_mask = jnp.zeros_like(group_scores, dtype=bool).at[
        jnp.arange(group_scores.shape[0])[:, None], top_groups].set(True)
    expert_mask = jnp.repeat(group_mask, cfg.n_routed_experts // cfg.n_group, axis=-1)  # [tokens, experts]
    return jnp.where(expert_mask, scores, fill)


# Decode-sized calls (at most this many token-slots, tokens * top-k) read only the chosen experts'
# weights (`gathered_experts`) instead of running the grouped matmul, whose GPU lowering touches every
# expert. Static (trace time); benchmarks/bench_generate.py measures the crossover.
GATHER_MAX_SLOTS = 32


def gathered_experts(x, ids, weights, gate_w, up_w, down_w, act: str):
    """Expert compute for a few tokens: each token-slot multiplies by its own expert's weights, so a decode
    step reads k experts per token and never the others. Same arguments and result as grouped_experts."""
    t, k = ids.shape
    flat = ids.reshape(-1)  # [slots]
    xs = jnp.repeat(x, k, axis=0)  # [slots, hidden]
    gate = jnp.einsum("sd,sdi->si", xs, jnp.take(gate_w, flat, axis=0))  # [slots, inter]
    up = jnp.einsum("sd,sdi->si", xs, jnp.take(up_w, flat, axis=0))  # [slots, inter]
    y = jnp.einsum("si,sid->sd", ACTIVATIONS[act](gate) * up, jnp.take(down_w, flat, axis=0))  # [slots, hidden]
    return jnp.einsum("tkd,tk->td", y.reshape(t, k, -1).astype(jnp.float32), weights).astype(x.dtype)


def grouped_experts(x, ids, weights, gate_w, up_w, down_w, act: str, num_experts: int):
    """Dropless expert compute. x [tokens, hidden]; ids/weights [tokens, k]; gate/up [E, hidden, inter],
    down [E, inter, hidden] -> [tokens, hidden]."""
    if ids.size <= GATHER_MAX_SLOTS:
        return gathered_experts(x, ids, weights, gate_w, up_w, down_w, act)
    t, k = ids.shape
    flat = ids.reshape(-1)  # [tokens * k]
    order = jnp.argsort(flat, stable=True)
    x_sorted = jnp.take(x, order // k, axis=0)  # [tokens * k, hidden], grouped by expert
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    h = ACTIVATIONS[act](jax.lax.ragged_dot(x_sorted, gate_w, group_sizes)) * jax.lax.ragged_dot(
        x_sorted, up_w, group_sizes)  # [tokens * k, inter]
    y_sorted = jax.lax.ragged_dot(h, down_w, group_sizes)  # [tokens * k, hidden]
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(t, k, -1)
    return jnp.einsum("tkd,tk->td", y.astype(jnp.float32), weights).astype(x.dtype)


class Experts(nnx.Module):
    """Routed experts' weights stacked on a leading expert axis, laid out [E, in, out] for ragged_dot."""

    def __init__(self, cfg: DeepseekConfig, *, dtype, rngs: nnx.Rngs, std: float):
        e, d, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = param(rngs, (e, d, i), dtype, ("experts", "embed", "moe_mlp"), std)
        self.up_proj = param(rngs, (e, d, i), dtype, ("experts", "embed", "moe_mlp"), std)
        self.down_proj = param(rngs, (e, i, d), dtype, ("experts", "moe_mlp", "embed"), std)


class Router(nnx.Module):
    def __init__(self, cfg: DeepseekConfig, *, dtype, rngs: nnx.Rngs, std: float):
        self.weight = param(rngs, (cfg.n_routed_experts, cfg.hidden_size), dtype, (None, "embed"), std)
        if cfg.topk_method == "noaux_tc":
            self.e_score_correction_bias = Buffer(jnp.zeros((cfg.n_routed_experts,), jnp.float32), axes=(None,))
        else:
            self.e_score_correction_bias = None

    def logits(self, x):  # x [tokens, hidden] -> [tokens, experts] float32
        return jnp.einsum("td,ed->te", x.astype(jnp.float32), self.weight[...].astype(jnp.float32))


class MoE(nnx.Module):
    def __init__(self, cfg: DeepseekConfig, *, dtype, rngs: nnx.Rngs, std: float):
        self.cfg = cfg
        self.gate = Router(cfg, dtype=dtype, rngs=rngs, std=std)
        self.experts = Experts(cfg, dtype=dtype, rngs=rngs, std=std)
        if cfg.n_shared_experts:
            self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts,
                                      act=cfg.hidden_act, bias=getattr(cfg, "mlp_bias", False), dtype=dtype,
                                      rngs=rngs, std=std)
        else:
            self.shared_experts = None

    def __call__(self, x):
        cfg = self.cfg
        b, s, d = x.shape
        with jax.named_scope("moe"):
            flat = x.reshape(b * s, d)
            bias = None if self.gate.e_score_correction_bias is None else self.gate.e_score_correction_bias[...]
            with jax.named_scope("router"):
                weights, ids = route(cfg, self.gate.logits(flat), bias)
            with jax.named_scope("experts"):
                y = grouped_experts(flat, ids, weights, self.experts.gate_proj[...], self.experts.up_proj[...],
                                    self.experts.down_proj[...], cfg.hidden_act, cfg.n_routed_experts)
            y = y.reshape(b, s, d)
            if self.shared_experts is not None:
                y = y + self.shared_experts(x)
            return y
