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

from jaxmodels import sharding
from jaxmodels.config import DeepseekConfig
from jaxmodels.layers.linear import ACTIVATIONS, lora_delta, param
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


# Decode-sized calls (at most this many token-slots, tokens * top-k; None: fewer slots than experts) read
# only the chosen experts' weights (`gathered_experts`) instead of running the grouped matmul, which reads
# every expert's weights whether or not a token picked it. Static (trace time);
# benchmarks/bench_generate.py measures the crossover.
GATHER_MAX_SLOTS: int | None = None
# "reduce": multiply + reduce, so XLA fuses the gather into the reduction and reads each chosen expert's
# weights once, in place; "einsum": gather (a copy of the chosen experts' weights), then batched matvecs.
GATHER_FORM = "reduce"
# Grouped matmul on Hopper GPUs: "auto" uses the Pallas Mosaic-GPU kernel where shapes allow (XLA's GPU
# ragged_dot expands densely over the groups: 14x slower at 64 experts, out of memory at 256; see
# benchmarks/bench_grouped_matmul.py), "xla" always jax.lax.ragged_dot.
GROUPED_MATMUL = "auto"


def gathered_experts(x, ids, weights, gate_w, up_w, down_w, act: str):
    """Expert compute for a few tokens: each token-slot multiplies by its own expert's weights, so a decode
    step reads k experts per token and never the others. Returns float32 [tokens, hidden]."""
    t, k = ids.shape
    flat = ids.reshape(-1)  # [slots]
    xs = jnp.repeat(x, k, axis=0)  # [slots, hidden]
    if GATHER_FORM == "einsum":
        gate = jnp.einsum("sd,sdi->si", xs, jnp.take(gate_w, flat, axis=0))  # [slots, inter]
        up = jnp.einsum("sd,sdi->si", xs, jnp.take(up_w, flat, axis=0))  # [slots, inter]
        y = jnp.einsum("si,sid->sd", ACTIVATIONS[act](gate) * up, jnp.take(down_w, flat, axis=0))  # [slots, hidden]
    else:
        f32 = jnp.float32
        xs = xs.astype(f32)
        gate = jnp.sum(xs[:, :, None] * gate_w[flat].astype(f32), axis=1)  # [slots, inter]
        up = jnp.sum(xs[:, :, None] * up_w[flat].astype(f32), axis=1)  # [slots, inter]
        h = (ACTIVATIONS[act](gate.astype(x.dtype)) * up.astype(x.dtype)).astype(f32)
        y = jnp.sum(h[:, :, None] * down_w[flat].astype(f32), axis=1)  # [slots, hidden]
    return jnp.einsum("tkd,tk->td", y.reshape(t, k, -1).astype(jnp.float32), weights)


def _mosaic_gpu_ok(lhs, rhs) -> bool:
    if GROUPED_MATMUL != "auto" or lhs.dtype != rhs.dtype or lhs.dtype not in (jnp.bfloat16, jnp.float16):
        return False
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return False
    if dev.platform != "gpu" or getattr(dev, "compute_capability", "") != "9.0":
        return False
    # Any expert count: it compiles in seconds at DeepSeek-V3's 256 (H100, bench_grouped_matmul.py).
    return lhs.shape[1] % 64 == 0 and rhs.shape[2] % 128 == 0


def grouped_matmul(lhs, rhs, group_sizes):
    """lhs [m, k] (rows sorted by group), rhs [groups, k, n], group_sizes [groups] -> [m, n]."""
    if _mosaic_gpu_ok(lhs, rhs):
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
        return ragged_dot_mgpu.ragged_dot(lhs, rhs, group_sizes=group_sizes, block_m=128, block_n=128, block_k=64,
                                          max_concurrent_steps=4, grid_block_n=1)
    return jax.lax.ragged_dot(lhs, rhs, group_sizes)


def local_experts(x, ids, weights, gate_w, up_w, down_w, act: str, first=0):
    """Dropless compute of the token-slots whose expert lies in [first, first + E_local), the experts whose
    weights are given; other slots contribute zero. x [tokens, hidden]; ids/weights [tokens, k]; gate/up
    [E_local, hidden, inter], down [E_local, inter, hidden] -> float32 [tokens, hidden].

    Decode-sized calls (fewer slots than experts, or GATHER_MAX_SLOTS) read only the chosen experts'
    weights; larger ones sort the slots by expert (foreign slots last) and run one grouped matmul per
    projection over the local experts, which leaves rows beyond the local groups at zero.
    """
    t, k = ids.shape
    e_local = gate_w.shape[0]
    local_ids = ids - first
    mine = (local_ids >= 0) & (local_ids < e_local)  # [t, k]
    if t * k <= (e_local - 1 if GATHER_MAX_SLOTS is None else GATHER_MAX_SLOTS):
        # A foreign slot reads local expert 0 with weight 0 instead of streaming every expert.
        return gathered_experts(x, jnp.where(mine, local_ids, 0), jnp.where(mine, weights, 0.0),
                                gate_w, up_w, down_w, act)
    key = jnp.where(mine, local_ids, e_local).reshape(-1)  # [t * k]; foreign slots sort last
    order = jnp.argsort(key, stable=True)
    x_sorted = jnp.take(x, order // k, axis=0)  # [t * k, hidden], grouped by expert
    group_sizes = jnp.bincount(key, length=e_local + 1)[:e_local].astype(jnp.int32)
    h = ACTIVATIONS[act](grouped_matmul(x_sorted, gate_w, group_sizes)) * grouped_matmul(
        x_sorted, up_w, group_sizes)  # [t * k, inter]
    y_sorted = grouped_matmul(h, down_w, group_sizes)  # [t * k, hidden]
    y_sorted = jnp.where((jnp.arange(t * k) < group_sizes.sum())[:, None], y_sorted, 0)
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(t, k, -1)
    return jnp.einsum("tkd,tk->td", y.astype(jnp.float32), weights)


def grouped_experts(x, ids, weights, gate_w, up_w, down_w, act: str):
    """Dropless expert compute on one device. gate/up [E, hidden, inter], down [E, inter, hidden]."""
    return local_experts(x, ids, weights, gate_w, up_w, down_w, act).astype(x.dtype)


def expert_parallel(x, ids, weights, gate_w, up_w, down_w, act: str, mesh, rules):
    """`grouped_experts` with the experts split over the mesh (expert parallelism), still dropless.

    Scheme: all-gather tokens, compute local experts, reduce-scatter. Inside `jax.shard_map` each device
    holds E / |expert| experts (and 1 / |tensor| of their intermediate dimension). It all-gathers the
    token-slots of its expert group (the tokens are split over `expert` as a batch axis elsewhere), sorts
    them by expert with the slots of other devices' experts sorted last, and runs the same grouped matmuls
    over its local experts only: ragged_dot leaves rows beyond the local groups at zero. The partial
    outputs are then reduce-scattered over `expert` (psum'd over `tensor`) back to each device's tokens.
    Each device runs `local_experts` (the single-device code) on its slice of the experts, so decode-sized
    calls gather the chosen local experts' weights as on one device.

    Why not all-to-all: a dropless all-to-all needs either a capacity (which drops tokens) or receive
    buffers sized for the worst case (every slot to one device, |expert| x the slots) plus a ragged
    all-to-all that the CPU backend lacks. The all-gather / reduce-scatter moves tokens x hidden per
    device in each direction, independent of routing, keeps static shapes, and never drops a token.
    """
    # Size-1 mesh axes are left out of the specs, so no value "varies" over them and no collective runs
    # over them (jax versions differ on how they treat a size-1 axis in shard_map's replication check).
    def spec(axes, shape):
        return sharding.trim_spec(sharding.logical_to_spec(axes, rules, mesh, shape), mesh)

    spec_w = spec(("experts", None, "moe_mlp"), gate_w.shape)
    spec_d = spec(("experts", "moe_mlp", None), down_w.shape)
    spec_t = spec(("batch", None), x.shape)
    exp_axes = sharding.mesh_axes_of_spec(spec_w, 0)  # the axes that really split E (those that divide it)
    red_axes = exp_axes + tuple(a for a in sharding.mesh_axes_of_spec(spec_w, 2) if a not in exp_axes)
    tok_axes = sharding.mesh_axes_of_spec(spec_t, 0)
    gather = tuple(a for a in tok_axes if a in red_axes)  # token shards that must meet every expert shard
    summed = tuple(a for a in red_axes if a not in gather)

    def local(x, ids, weights, gate_w, up_w, down_w):
        if gather:
            x = jax.lax.all_gather(x, gather, axis=0, tiled=True)  # [tokens of the group, hidden]
            ids = jax.lax.all_gather(ids, gather, axis=0, tiled=True)
            weights = jax.lax.all_gather(weights, gather, axis=0, tiled=True)
        first = jax.lax.axis_index(exp_axes) * gate_w.shape[0] if exp_axes else 0
        out = local_experts(x, ids, weights, gate_w, up_w, down_w, act, first)  # [t, hidden] f32, partial
        if gather:
            out = jax.lax.psum_scatter(out, gather, scatter_dimension=0, tiled=True)  # back to my tokens
        if summed:
            out = jax.lax.psum(out, summed)  # over the other expert / tensor shards
        return out.astype(x.dtype)

    return jax.shard_map(local, mesh=mesh, in_specs=(spec_t, spec_t, spec_t, spec_w, spec_w, spec_d),
                         out_specs=spec_t)(x, ids, weights, gate_w, up_w, down_w)


class Experts(nnx.Module):
    """Routed experts' weights stacked on a leading expert axis, laid out [E, in, out] for ragged_dot."""

    PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, cfg: DeepseekConfig, *, dtype, rngs: nnx.Rngs, std: float):
        e, d, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = param(rngs, (e, d, i), dtype, ("experts", "embed", "moe_mlp"), std)
        self.up_proj = param(rngs, (e, d, i), dtype, ("experts", "embed", "moe_mlp"), std)
        self.down_proj = param(rngs, (e, i, d), dtype, ("experts", "moe_mlp", "embed"), std)
        # Optional LoRA (train/lora.py): one adapter per expert and projection, PEFT layout per expert:
        # `{name}_lora_a` [E, r, in], `{name}_lora_b` [E, out, r]; lora_scale = alpha / r.
        for name in self.PROJECTIONS:  # data attributes (nnx.data): they may hold LoRAParams later
            setattr(self, f"{name}_lora_a", nnx.data(None))
            setattr(self, f"{name}_lora_b", nnx.data(None))
        self.lora_scale: float | None = None

    def weights(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(gate [E, hidden, inter], up [E, hidden, inter], down [E, inter, hidden]), LoRA folded in.

        With adapters this materialises the effective weights W + scale * (B @ A).T of one layer (inside
        the scan, so one layer at a time): an extra copy of that layer's expert weights in memory, and the
        gradient flows to A and B through it. Simple and exact; a low-rank grouped path would save the copy.
        """
        out = []
        for name in self.PROJECTIONS:
            w = getattr(self, name)[...]
            a = getattr(self, f"{name}_lora_a")
            if a is not None:
                delta = lora_delta(a[...], getattr(self, f"{name}_lora_b")[...], self.lora_scale)  # [E, out, in]
                w = (w.astype(jnp.float32) + jnp.swapaxes(delta, -1, -2)).astype(w.dtype)  # [E, in, out]
            out.append(w)
        return tuple(out)


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
        # As transformers and DeepSeek's own code: shared experts exist unless n_shared_experts is None. With
        # n_shared_experts=0 the checkpoint holds zero-width tensors; keep them (they add exactly zero) so the
        # parameter tree matches the checkpoint key for key, in both directions.
        if cfg.n_shared_experts is not None:
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
                experts = self.experts.weights()
                mesh, rules = sharding.current()
                if mesh is None:
                    y = grouped_experts(flat, ids, weights, *experts, cfg.hidden_act)
                else:
                    y = expert_parallel(flat, ids, weights, *experts, cfg.hidden_act, mesh, rules)
            y = y.reshape(b, s, d)
            if self.shared_experts is not None:
                y = y + self.shared_experts(x)
            return y
