"""DeepSeekMoE: routed experts chosen by a top-k router, plus always-on shared experts.

Routers (transformers' semantics):
* V2 `greedy`: softmax scores, top-k.
* V2 `group_limited_greedy`: softmax scores; keep the `topk_group` groups with the highest max score.
* V3 `noaux_tc`: sigmoid scores; `e_score_correction_bias` is added for the *choice* only; groups ranked
  by the sum of their top-2 biased scores; weights are the unbiased scores, renormalised if
  `norm_topk_prob`.
All then scale by `routed_scaling_factor`.

Compute is dropless: token-slots are sorted by expert and run through two grouped matmuls (gate and up
fused in one, then down; `jax.lax.ragged_dot` or the Hopper kernels), then unsorted and combined with the
routing weights.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels import sharding
from jaxmodels.config import DeepseekConfig
from jaxmodels.layers.linear import ACTIVATIONS, gated, lora_delta, param
from jaxmodels.layers.mlp import MLP
from jaxmodels.options import GROUPED_MATMUL_IMPLS, Options


class Buffer(nnx.Variable):
    """Checkpoint state that is not trained by gradients (V3's e_score_correction_bias)."""


def route(cfg: DeepseekConfig, logits: jax.Array, bias: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Router logits [tokens, experts] (float32) -> (weights [tokens, k] float32, expert ids [tokens, k],
    scores [tokens, experts] float32: the unbiased router probabilities the balance losses use)."""
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
        return weights * cfg.routed_scaling_factor, ids, scores / (scores.sum(-1, keepdims=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, ids, jax.nn.softmax(logits, axis=-1)


def router_stats(ids: jax.Array, scores: jax.Array, valid: jax.Array, num_experts: int) -> dict[str, jax.Array]:
    """Per-row routing statistics for balancing and logging (tiny: [batch, experts], no per-token output).

    ids [b, s, k]; scores [b, s, experts] (probabilities summing to 1 per token); valid [b, s] bool (padding
    and packing gaps are False). Returns {"load": token-slots sent to each expert, "score": summed scores},
    both float32 [b, experts] over valid tokens only.
    """
    b = ids.shape[0]
    w = jnp.broadcast_to(valid[..., None], ids.shape).astype(jnp.float32)  # [b, s, k]
    rows = jnp.broadcast_to(jnp.arange(b)[:, None, None], ids.shape)
    load = jnp.zeros((b, num_experts), jnp.float32).at[rows, ids].add(w)  # [b, experts]
    score = jnp.einsum("bse,bs->be", scores, valid.astype(jnp.float32))  # [b, experts]
    return {"load": load, "score": score}


def _keep_top_groups(scores, group_scores, cfg: DeepseekConfig, fill):
    """Replaces the scores of experts outside the `topk_group` best groups by `fill`."""
    _, top_groups = jax.lax.top_k(group_scores, cfg.topk_group)  # [tokens, topk_group]
    group_mask = jnp.zeros_like(group_scores, dtype=bool).at[
        jnp.arange(group_scores.shape[0])[:, None], top_groups].set(True)
    expert_mask = jnp.repeat(group_mask, cfg.n_routed_experts // cfg.n_group, axis=-1)  # [tokens, experts]
    return jnp.where(expert_mask, scores, fill)


# Static choices come from the model's options (jaxmodels.options.Options, read at trace time):
# * gather_max_slots: decode-sized calls (at most this many token-slots, tokens * top-k; None: fewer slots than
#   experts) read only the chosen experts' weights (`gathered_experts`) instead of running the grouped matmul,
#   which reads every expert's weights whether or not a token picked it; benchmarks/bench_generate.py measures
#   the crossover.
# * gather_form: "reduce": multiply + reduce, so XLA fuses the gather into the reduction and reads each chosen
#   expert's weights once, in place; "einsum": gather (a copy of the chosen experts' weights), then batched
#   matvecs.
# * grouped_matmul on Hopper GPUs: "auto" uses the Pallas Mosaic-GPU kernels where shapes allow, forward and
#   backward (XLA's GPU ragged_dot expands densely over the groups: 14x slower at 64 experts, out of memory at
#   256; see benchmarks/bench_grouped_matmul.py); "auto-xla-drhs" the same but the weight gradient by XLA (in
#   case jax's transposed ragged-dot kernel misbehaves: its upstream test is disabled); "xla" always
#   jax.lax.ragged_dot.
# On TPU every impl is jax.lax.ragged_dot: XLA's TPU backend compiles it to its own grouped-matmul kernel
# ("ragged-dot" in the HLO), partitioned with the rest of the program, and its cost model prices it (V2-Lite's
# gate projection, 8192 slots x 16 experts on one v5p chip: 0.12 ms for 47.2 GFLOP, 86% of the bf16 peak).
# megablox `gmm` compiles for the same shapes but needs a shard_map and tile choices of its own, and XLA has no
# cost model for a Pallas call, so a plan could not price the step: benchmarks/RESULTS.md, "Pods".
_IMPLS = GROUPED_MATMUL_IMPLS


@functools.partial(jax.checkpoint, prevent_cse=False)
def combine_slots(y: jax.Array, weights: jax.Array) -> jax.Array:
    """sum_k weights[t, k] * y[t, k, :] in float32 -> [tokens, hidden]. Under differentiation this keeps y in
    its own dtype (bf16 in training) for the weights' gradient and recomputes the float32 cast in the backward
    pass (`jax.checkpoint`), instead of saving a float32 [tokens, top_k, hidden] copy per MoE layer."""
    return jnp.einsum("tkd,tk->td", y.astype(jnp.float32), weights)


def gathered_experts(x, ids, weights, gate_up_w, down_w, act: str, form: str = "reduce"):
    """Expert compute for a few tokens: each token-slot multiplies by its own expert's weights, so a decode
    step reads k experts per token and never the others. gate_up_w [E, 2, inter, hidden], down_w
    [E, inter, hidden]; form: Options.gather_form. Returns float32 [tokens, hidden]."""
    t, k = ids.shape
    flat = ids.reshape(-1)  # [slots]
    xs = jnp.repeat(x, k, axis=0)  # [slots, hidden]
    if form == "einsum":
        gate_up = jnp.einsum("sd,sjid->sji", xs, jnp.take(gate_up_w, flat, axis=0))  # [slots, 2, inter]
        h = ACTIVATIONS[act](gate_up[:, 0]) * gate_up[:, 1]  # [slots, inter]
        y = jnp.einsum("si,sid->sd", h, jnp.take(down_w, flat, axis=0))  # [slots, hidden]
    else:
        f32 = jnp.float32
        xs = xs.astype(f32)
        gate_up = jnp.sum(xs[:, None, None, :] * gate_up_w[flat].astype(f32), axis=-1)  # [slots, 2, inter]
        h = (ACTIVATIONS[act](gate_up[:, 0].astype(x.dtype)) * gate_up[:, 1].astype(x.dtype)).astype(f32)
        y = jnp.sum(h[:, :, None] * down_w[flat].astype(f32), axis=1)  # [slots, hidden]
    return combine_slots(y.reshape(t, k, -1), weights)


# Tiles of the Mosaic-GPU kernels (H100, benchmarks/bench_grouped_matmul.py). A kernel needs its contraction
# dimension a multiple of _BLOCK_K and each output dimension but the ragged rows a multiple of its output
# tile (it stores whole tiles); _mosaic_gpu_ok checks exactly that for each of the three products.
_BLOCK_K = 64
_FWD_TILES = dict(block_m=128, block_k=_BLOCK_K, max_concurrent_steps=4)
# The forward kernel walks its (row tile, column tile) grid in bands of `grid_block_n` column tiles, so a row
# tile of lhs is reused from L2 across the band (bands of 8 are faster: RESULTS.md, "Grouped matmul: bands of
# 8 column tiles"). The first of these bands that divides the column tiles is used (jax's own autotuner requires
# that); else 1.
_GRID_BANDS = (8,)


def _forward_tiles(n: int) -> dict:
    """The forward kernel's tile arguments for an output width n (a multiple of 128). 4 pipelined loads and
    bands of 8 gave the fastest whole prefill (RESULTS.md, "Figures moved out of the code")."""
    band = next((w for w in _GRID_BANDS if (n // 128) % w == 0), 1)
    return dict(_FWD_TILES, block_n=128, grid_block_n=band)


def _out_tile(dim: int) -> int:
    """The widest output tile (128, else 64) that divides dim; 0 if none does."""
    return 128 if dim % 128 == 0 else 64 if dim % 64 == 0 else 0


def _transposed_kernel():
    """jax's Mosaic-GPU transposed ragged dot (contraction over the ragged rows), or None where this jax
    lacks it (it is in jax 0.10.2 and 0.11)."""
    try:
        from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu
    except ImportError:
        return None
    return getattr(transposed_ragged_dot_mgpu, "transposed_ragged_dot", None)


def _mosaic_gpu_ok(lhs, rhs, impl: str, device=None, transpose_rhs: bool = False) -> tuple[bool, bool, bool]:
    """Which products of `grouped_matmul` run as Hopper Mosaic-GPU kernels: (forward, d_lhs, d_rhs).

    lhs [m, k], rhs [groups, k, n]; impl as `grouped_matmul`'s; device: the one to decide for (default
    jax.devices()[0]). The three products and the kernel each would use:
      forward  [m, k] x [k, n] per group        ragged_dot_mgpu.ragged_dot: contract k, output n
      d_lhs    [m, n] x [n, k] per group        the same kernel, transpose_rhs: contract n, output k
      d_rhs    lhs_g^T [k, m_g] x dOut_g [m_g, n] transposed_ragged_dot_mgpu: contract the ragged rows,
                                                output [k, n] per group
    Without the forward kernel the whole op is jax.lax.ragged_dot (differentiable as it is); with it, a
    backward product the kernels cannot take (shapes, impl, a jax without the transposed kernel) runs as
    XLA's ragged_dot_general inside the same custom VJP. (With the forward's constraints, k % 64 and
    n % 128, the backward constraints below always hold; they are spelled out so a change of tiles keeps
    them right.)
    transpose_rhs: rhs is [groups, n, k] (`grouped_matmul(..., transpose_rhs=True)`); the same three products
    then use the kernels the other way round: forward with transpose_rhs (contract k, output n), d_lhs the
    plain kernel (contract n, output k), d_rhs the transposed kernel on (dOut, lhs) (output [n, k]).
    """
    if impl not in _IMPLS:
        raise ValueError(f"grouped matmul impl={impl!r}: expected one of {_IMPLS}")
    no = (False, False, False)
    if impl == "xla" or lhs.dtype != rhs.dtype or lhs.dtype not in (jnp.bfloat16, jnp.float16):
        return no
    if device is None:
        try:
            device = jax.devices()[0]
        except RuntimeError:
            return no
    if device.platform != "gpu" or getattr(device, "compute_capability", "") != "9.0":
        return no
    k, n = (rhs.shape[2], rhs.shape[1]) if transpose_rhs else (rhs.shape[1], rhs.shape[2])
    # Any expert count: it compiles in seconds at DeepSeek-V3's 256 (bench_grouped_matmul.py).
    fwd = k % _BLOCK_K == 0 and n % 128 == 0
    if not fwd:
        return no
    d_lhs = n % _BLOCK_K == 0 and _out_tile(k) > 0
    # d_rhs: the transposed kernel's output [k, n] (or [n, k]) is tiled rows x 128 columns.
    rows, cols = (n, k) if transpose_rhs else (k, n)
    d_rhs = impl == "auto" and _out_tile(rows) > 0 and cols % 128 == 0 and _transposed_kernel() is not None
    return fwd, d_lhs, d_rhs


# The three products, each as a Mosaic-GPU kernel and as XLA's ragged dot. The Mosaic ones leave output rows
# beyond sum(group_sizes) unwritten; `_grouped_matmul_vjp` zeroes them.
def _mosaic_fwd(lhs, rhs, group_sizes):  # [m, k], [G, k, n] -> [m, n]
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    return ragged_dot_mgpu.ragged_dot(lhs, rhs, group_sizes=group_sizes, **_forward_tiles(rhs.shape[2]))


def _mosaic_dlhs(dout, rhs, group_sizes):  # [m, n], [G, k, n] -> [m, k]: dout_g @ rhs_g^T
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    # transpose_rhs reads rhs [G, k, n] as [G, out, contraction] and transposes its tiles in shared memory:
    # the weights are never copied transposed.
    return ragged_dot_mgpu.ragged_dot(dout, rhs, group_sizes=group_sizes, block_n=_out_tile(rhs.shape[1]),
                                      transpose_rhs=True, grid_block_n=1, **_FWD_TILES)


def _mosaic_drhs(lhs, dout, group_sizes):  # [m, k], [m, n] -> [G, k, n]: lhs_g^T @ dout_g, 0 for empty groups
    kernel = _transposed_kernel()
    # The kernel's dynamic pipeline grid mixes Python ints and int32 (jax's own test sets this too).
    with jax.numpy_dtype_promotion("standard"):
        return kernel(lhs, dout, group_sizes=group_sizes, block_m=_out_tile(lhs.shape[1]), block_n=128,
                      block_k=_BLOCK_K, max_concurrent_steps=4, grid_block_n=1)


# The same three products for rhs stored [G, n, k] (transpose_rhs): each is one of the kernels above, with
# the roles of the operands exchanged.
def _mosaic_fwd_t(lhs, rhs_t, group_sizes):  # [m, k], [G, n, k] -> [m, n]: lhs_g @ rhs_t_g^T
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    return ragged_dot_mgpu.ragged_dot(lhs, rhs_t, group_sizes=group_sizes, transpose_rhs=True,
                                      **_forward_tiles(rhs_t.shape[1]))


def _mosaic_dlhs_t(dout, rhs_t, group_sizes):  # [m, n], [G, n, k] -> [m, k]: dout_g @ rhs_t_g
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    k = rhs_t.shape[2]
    tiles = _forward_tiles(k) if _out_tile(k) == 128 else dict(_FWD_TILES, block_n=_out_tile(k), grid_block_n=1)
    return ragged_dot_mgpu.ragged_dot(dout, rhs_t, group_sizes=group_sizes, **tiles)


def _mosaic_drhs_t(lhs, dout, group_sizes):  # [m, k], [m, n] -> [G, n, k]: dout_g^T @ lhs_g
    return _mosaic_drhs(dout, lhs, group_sizes)


def _xla_fwd(lhs, rhs, group_sizes):
    return jax.lax.ragged_dot(lhs, rhs, group_sizes)


def _xla_dlhs(dout, rhs, group_sizes):
    dims = jax.lax.RaggedDotDimensionNumbers(  # contract dout's n with rhs's n; rows ragged; rhs grouped
        dot_dimension_numbers=(((1,), (2,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
    return jax.lax.ragged_dot_general(dout, rhs, group_sizes, dims)


def _xla_drhs(lhs, dout, group_sizes):
    dims = jax.lax.RaggedDotDimensionNumbers(  # contract the ragged rows: one [k, n] product per group
        dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    return jax.lax.ragged_dot_general(lhs, dout, group_sizes, dims)


def _xla_drhs_t(lhs, dout, group_sizes):
    return _xla_drhs(dout, lhs, group_sizes)


# (forward, d_lhs, d_rhs) per layout: transpose_rhs's forward is the plain layout's d_lhs product and vice versa.
_XLA_KERNELS = {False: (_xla_fwd, _xla_dlhs, _xla_drhs), True: (_xla_dlhs, _xla_fwd, _xla_drhs_t)}


def _zero_tail(x, group_sizes):
    """x [m, ...] with the rows beyond sum(group_sizes), which no group owns, set to zero."""
    owned = jnp.arange(x.shape[0]) < jnp.sum(group_sizes)  # [m]
    return jnp.where(owned.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))


@functools.cache
def _grouped_matmul_vjp(fwd, dlhs, drhs):
    """A grouped matmul with a custom VJP built from three kernels (the Mosaic-GPU ones on Hopper, XLA's in
    the CPU tests):
      fwd(lhs [m, k], rhs [G, k, n], group_sizes) -> [m, n]
      dlhs(dout [m, n], rhs [G, k, n], group_sizes) -> [m, k], dout_g @ rhs_g^T per group
      drhs(lhs [m, k], dout [m, n], group_sizes) -> [G, k, n], lhs_g^T @ dout_g per group (0 if empty)
    Kernels may leave rows beyond sum(group_sizes) unwritten. Returns f(lhs, rhs, group_sizes) -> [m, n] with
    jax.lax.ragged_dot's meaning: rows beyond the groups are zero, get zero gradient, and what they hold
    never reaches rhs's gradient.
    """

    @jax.custom_vjp
    def gmm(lhs, rhs, group_sizes):
        return _zero_tail(fwd(lhs, rhs, group_sizes), group_sizes)

    def gmm_fwd(lhs, rhs, group_sizes):
        # The transposed kernel masks a group's edge rows by multiplying them by zero, so an Inf/NaN in a row
        # no group owns would leak into d_rhs: zero lhs's tail before it is saved (XLA fuses the select into
        # whatever produced lhs). The forward reads only owned rows, so it may use either.
        lhs = _zero_tail(lhs, group_sizes)
        return _zero_tail(fwd(lhs, rhs, group_sizes), group_sizes), (lhs, rhs, group_sizes)

    def gmm_bwd(res, dout):
        lhs, rhs, group_sizes = res
        dout = _zero_tail(dout, group_sizes)  # the tail of the output is constant zero: no gradient flows
        d_lhs = _zero_tail(dlhs(dout, rhs, group_sizes), group_sizes)  # [m, k]
        d_rhs = drhs(lhs, dout, group_sizes)  # [G, k, n]
        return d_lhs.astype(lhs.dtype), d_rhs.astype(rhs.dtype), None  # group_sizes: integer, no gradient

    gmm.defvjp(gmm_fwd, gmm_bwd)
    return gmm


def grouped_matmul(lhs, rhs, group_sizes, impl: str = "auto", transpose_rhs: bool = False):
    """Multiplies each group of rows by its group's matrix, with jax.lax.ragged_dot's meaning.

    lhs [m, k] (rows sorted by group), rhs [groups, k, n], group_sizes [groups] int32 -> [m, n]: rows
    [start_g, start_g + group_sizes[g]) are multiplied by rhs[g]; rows beyond sum(group_sizes) come out zero
    and get zero gradient (local_experts relies on both). Differentiable on every path.
    transpose_rhs: rhs is stored [groups, n, k] (each group's matrix [out, in], as transformers stores
    weights) and row r of group g gives lhs[r] @ rhs[g].T; no transposed copy of rhs is made.
    impl: "auto" (Mosaic-GPU kernels on Hopper, forward and backward, where the shapes allow; XLA
    otherwise), "auto-xla-drhs" (the same with rhs's gradient by XLA) or "xla" (jax.lax.ragged_dot): the
    model's Options.grouped_matmul.
    """
    fwd, d_lhs, d_rhs = _mosaic_gpu_ok(lhs, rhs, impl, transpose_rhs=transpose_rhs)
    xla = _XLA_KERNELS[transpose_rhs]
    if not fwd:
        return xla[0](lhs, rhs, group_sizes)  # jax.lax.ragged_dot(_general): differentiable as it is
    mosaic = (_mosaic_fwd_t, _mosaic_dlhs_t, _mosaic_drhs_t) if transpose_rhs else (
        _mosaic_fwd, _mosaic_dlhs, _mosaic_drhs)
    return _grouped_matmul_vjp(mosaic[0], mosaic[1] if d_lhs else xla[1],
                               mosaic[2] if d_rhs else xla[2])(lhs, rhs, group_sizes)


# Token-slots (tokens x top-k) one grouped-matmul pass sorts and multiplies at most; larger calls (a training
# step's MoE over the expert group's gathered tokens) run in equal chunks of tokens, one after another, each
# recomputed in the backward pass: the dispatch buffers ([slots, hidden] sorted copies, [slots, inter]
# activations, the gathered tokens and their float32 partial outputs) then exist for one chunk at a time.
# DeepSeek-V3 on a v5p-256 (4096 tokens per chip, experts over 8 chips): 262144 slots, 3.5 GiB per [slots, hidden]
# bf16 buffer in one pass (jaxmodels plan --compile, benchmarks/RESULTS.md).
MAX_SLOTS_PER_CHUNK = 32768


def _num_chunks(tokens: int, k: int) -> int:
    """Chunks of equal size (a divisor of tokens) with at most MAX_SLOTS_PER_CHUNK slots each (1: no chunking)."""
    n = max(1, -(-tokens * k // MAX_SLOTS_PER_CHUNK))
    while tokens % n:
        n += 1
    return n


def chunked_experts(x, ids, weights, gate_up_w, down_w, act: str, first=0, options: Options = Options(),
                    gather: tuple[str, ...] = (), group: int = 1):
    """`local_experts` over chunks of tokens when the call has more than MAX_SLOTS_PER_CHUNK slots (the same
    values: tokens are independent). Each chunk is a checkpointed step of a loop, so neither pass keeps more
    than one chunk's dispatch buffers.

    Inside expert_parallel's shard_map, `gather` names the mesh axes (`group` devices) whose tokens meet these
    experts: each chunk of this device's tokens is all-gathered over them, computed, and its partial outputs
    reduce-scattered back, so the expert group's tokens are never gathered whole either."""
    t, k = ids.shape

    def one(xc, ic, wc):
        if gather:
            xc, ic, wc = (jax.lax.all_gather(a, gather, axis=0, tiled=True) for a in (xc, ic, wc))
        out = local_experts(xc, ic, wc, gate_up_w, down_w, act, first, options)  # [chunk (x group), hidden] f32
        return jax.lax.psum_scatter(out, gather, scatter_dimension=0, tiled=True) if gather else out

    n = _num_chunks(t, k * group)
    if not options.scan:  # the unrolled programs XLA's cost analysis prices: the same work in at most 2 chunks
        n = min(n, 2 if t % 2 == 0 else 1)
    if n == 1:
        return one(x, ids, weights)
    chunks = (x.reshape(n, t // n, -1), ids.reshape(n, t // n, k), weights.reshape(n, t // n, k))
    one = jax.checkpoint(one)
    # A loop, unrolled when the layers are (Options.scan False: the programs whose cost XLA's cost analysis
    # prices, which counts a loop body once; jaxmodels.pods.estimate_cost; few chunks keep them small).
    _, out = jax.lax.scan(lambda carry, chunk: (carry, one(*chunk)), None, chunks, unroll=not options.scan)
    return out.reshape(t, -1)  # [t, hidden] float32


def local_experts(x, ids, weights, gate_up_w, down_w, act: str, first=0, options: Options = Options()):
    """Dropless compute of the token-slots whose expert lies in [first, first + E_local), the experts whose
    weights are given; other slots contribute zero. x [tokens, hidden]; ids/weights [tokens, k]; gate_up
    [E_local, 2, inter, hidden] (gate and up fused, [out, in] each), down [E_local, inter, hidden] -> float32
    [tokens, hidden].

    Decode-sized calls (fewer slots than experts, or options.gather_max_slots) read only the chosen experts'
    weights; larger ones sort the slots by expert (foreign slots last) and run two grouped matmuls over the
    local experts (gate and up as one, then down), which leave rows beyond the local groups at zero.
    """
    t, k = ids.shape
    e_local, _, inter, hidden = gate_up_w.shape
    local_ids = ids - first
    mine = (local_ids >= 0) & (local_ids < e_local)  # [t, k]
    max_slots = e_local - 1 if options.gather_max_slots is None else options.gather_max_slots
    if t * k <= max_slots:
        # A foreign slot reads local expert 0 with weight 0 instead of streaming every expert.
        return gathered_experts(x, jnp.where(mine, local_ids, 0), jnp.where(mine, weights, 0.0),
                                gate_up_w, down_w, act, options.gather_form)
    key = jnp.where(mine, local_ids, e_local).reshape(-1)  # [t * k]; foreign slots sort last
    order = jnp.argsort(key, stable=True).astype(jnp.int32)  # sorted position -> slot
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(t * k, dtype=jnp.int32))  # slot -> sorted position
    # Every token once per slot, then the slots in expert order: [t * k, hidden], grouped by expert.
    x_sorted = permute_rows(jnp.repeat(x, k, axis=0), order, inverse)
    group_sizes = jnp.bincount(key, length=e_local + 1)[:e_local].astype(jnp.int32)
    impl = options.grouped_matmul
    # One grouped matmul for gate and up: [E, 2, inter, hidden] is [E, 2 * inter, hidden] ([out, in]) in place.
    gate_up = grouped_matmul(x_sorted, gate_up_w.reshape(e_local, 2 * inter, hidden), group_sizes, impl,
                             transpose_rhs=True)  # [t * k, 2 * inter]: gate, then up
    h = gated(gate_up[:, :inter], gate_up[:, inter:], act)  # [t * k, inter]
    y_sorted = grouped_matmul(h, down_w, group_sizes, impl)  # [t * k, hidden]; foreign slots' rows are zero
    y = permute_rows(y_sorted, inverse, order).reshape(t, k, -1)  # back to slot order
    return combine_slots(y, weights)


@jax.custom_vjp
def permute_rows(x: jax.Array, perm: jax.Array, inverse: jax.Array) -> jax.Array:
    """x[perm] for a permutation perm of x's rows (inverse: its inverse), whose gradient is again a gather,
    dy[inverse], instead of the scatter-add jax would differentiate a general gather into (a scatter with
    colliding-index semantics is slow on GPUs: RESULTS.md, "Figures moved out of the code")."""
    return jnp.take(x, perm, axis=0)


def _permute_rows_fwd(x, perm, inverse):
    return jnp.take(x, perm, axis=0), (perm, inverse)


def _permute_rows_bwd(res, dy):
    perm, inverse = res
    return jnp.take(dy, inverse, axis=0), None, None


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def grouped_experts(x, ids, weights, gate_up_w, down_w, act: str, options: Options = Options()):
    """Dropless expert compute on one device. gate_up [E, 2, inter, hidden], down [E, inter, hidden]."""
    return local_experts(x, ids, weights, gate_up_w, down_w, act, options=options).astype(x.dtype)


def expert_parallel(x, ids, weights, gate_up_w, down_w, act: str, options: Options):
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
    mesh, rules = options.mesh, options.rules
    # Size-1 mesh axes are left out of the specs, so no value "varies" over them and no collective runs
    # over them (jax versions differ on how they treat a size-1 axis in shard_map's replication check).
    def spec(axes, shape):
        return sharding.trim_spec(sharding.logical_to_spec(axes, rules, mesh, shape), mesh)

    spec_w = spec(("experts", None, "moe_mlp", None), gate_up_w.shape)
    spec_d = spec(("experts", "moe_mlp", None), down_w.shape)
    spec_t = spec(("batch", None), x.shape)
    exp_axes = sharding.mesh_axes_of_spec(spec_w, 0)  # the axes that really split E (those that divide it)
    red_axes = exp_axes + tuple(a for a in sharding.mesh_axes_of_spec(spec_w, 2) if a not in exp_axes)
    tok_axes = sharding.mesh_axes_of_spec(spec_t, 0)
    gather = tuple(a for a in tok_axes if a in red_axes)  # token shards that must meet every expert shard
    summed = tuple(a for a in red_axes if a not in gather)

    def local(x, ids, weights, gate_up_w, down_w):
        first = jax.lax.axis_index(exp_axes) * gate_up_w.shape[0] if exp_axes else 0
        if gather:  # chunk by chunk: gather the group's tokens, compute my experts, reduce-scatter (see above)
            out = chunked_experts(x, ids, weights, gate_up_w, down_w, act, first, options, gather,
                                  math.prod(mesh.shape[a] for a in gather))
        else:
            out = local_experts(x, ids, weights, gate_up_w, down_w, act, first, options)  # [t, hidden] partial
        if summed:
            out = jax.lax.psum(out, summed)  # over the other expert / tensor shards
        return out.astype(x.dtype)

    return jax.shard_map(local, mesh=mesh, in_specs=(spec_t, spec_t, spec_t, spec_w, spec_d),
                         out_specs=spec_t)(x, ids, weights, gate_up_w, down_w)


class Experts(nnx.Module):
    """Routed experts' weights stacked on a leading expert axis.

    gate and up are one parameter, `gate_up_proj` [E, 2, inter, hidden]: each expert's gate_proj then up_proj
    weight as transformers stores them ([out, in]), so one grouped matmul (transpose_rhs) computes both and a
    checkpoint's per-expert tensors load without a transpose. `down_proj` is [E, inter, hidden] ([in, out],
    as ragged_dot takes it)."""

    PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # transformers' modules (LoRA adapters are per module)
    PARAMS = ("gate_up_proj", "down_proj")  # what `weights()` returns, in this order

    def __init__(self, cfg: DeepseekConfig, *, dtype, rngs: nnx.Rngs, std: float):
        e, d, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        # The hidden dimension is `expert_embed`, not `embed`: a table may then split the other weights' `embed`
        # over (fsdp, expert) while the experts, already split over `expert`, take fsdp alone (jaxmodels.pods).
        self.gate_up_proj = param(rngs, (e, 2, i, d), dtype, ("experts", None, "moe_mlp", "expert_embed"), std)
        self.down_proj = param(rngs, (e, i, d), dtype, ("experts", "moe_mlp", "expert_embed"), std)
        # Optional LoRA (train/lora.py): one adapter per expert and projection, PEFT layout per expert:
        # `{name}_lora_a` [E, r, in], `{name}_lora_b` [E, out, r]; lora_scale = alpha / r.
        for name in self.PROJECTIONS:  # data attributes (nnx.data): they may hold LoRAParams later
            setattr(self, f"{name}_lora_a", nnx.data(None))
            setattr(self, f"{name}_lora_b", nnx.data(None))
        self.lora_scale: float | None = None

    def projection_layout(self, name: str) -> tuple[tuple[int, ...], tuple | None]:
        """The shape of one projection's weights as transformers lays them out, [..., E, out, in], and their
        logical axes: what a LoRA adapter of `name` (gate_proj / up_proj / down_proj) adapts."""
        if name == "down_proj":
            *lead, i, o = self.down_proj.shape
            axes = self.down_proj.get_metadata().get("axes")
            return (*lead, o, i), None if not axes else tuple(axes[:-2]) + (axes[-1], axes[-2])
        *lead, _, o, i = self.gate_up_proj.shape
        axes = self.gate_up_proj.get_metadata().get("axes")
        return (*lead, o, i), None if not axes else tuple(axes[:-3]) + tuple(axes[-2:])

    def weights(self) -> tuple[jax.Array, jax.Array]:
        """(gate_up [E, 2, inter, hidden], down [E, inter, hidden]), LoRA folded in.

        With adapters this materialises the effective weights W + scale * B @ A of one layer (inside the
        scan, so one layer at a time): an extra copy of that layer's expert weights in memory, and the
        gradient flows to A and B through it. Simple and exact; a low-rank grouped path would save the copy.
        """
        def delta(name):  # [E, out, in] float32, or None without an adapter
            a = getattr(self, f"{name}_lora_a")
            return None if a is None else lora_delta(a[...], getattr(self, f"{name}_lora_b")[...], self.lora_scale)

        gate_up, down = self.gate_up_proj[...], self.down_proj[...]
        gate_d, up_d, down_d = (delta(n) for n in self.PROJECTIONS)
        if gate_d is not None or up_d is not None:
            parts = [gate_up[..., j, :, :].astype(jnp.float32) + (0.0 if d is None else d)
                     for j, d in enumerate((gate_d, up_d))]
            gate_up = jnp.stack(parts, axis=-3).astype(gate_up.dtype)  # [E, 2, inter, hidden]
        if down_d is not None:
            down = (down.astype(jnp.float32) + jnp.swapaxes(down_d, -1, -2)).astype(down.dtype)  # [E, inter, hidden]
        return gate_up, down


class Router(nnx.Module):
    def __init__(self, cfg: DeepseekConfig, *, dtype, rngs: nnx.Rngs, std: float):
        self.weight = param(rngs, (cfg.n_routed_experts, cfg.hidden_size), dtype, (None, "embed"), std)
        if cfg.topk_method == "noaux_tc":
            self.e_score_correction_bias = Buffer(jnp.zeros((cfg.n_routed_experts,), jnp.float32), axes=(None,))
        else:
            self.e_score_correction_bias = None

    def logits(self, x):  # x [tokens, hidden] -> [tokens, experts] float32
        return _router_logits(x, self.weight[...])


@functools.partial(jax.checkpoint, prevent_cse=False)
def _router_logits(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [tokens, hidden] @ w [experts, hidden]^T in float32; differentiated, it keeps x in its own dtype and
    recomputes the float32 cast (no float32 [tokens, hidden] copy saved per MoE layer)."""
    return jnp.einsum("td,ed->te", x.astype(jnp.float32), w.astype(jnp.float32))


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

    def __call__(self, x, inputs):
        """x [b, s, hidden]; inputs: the forward inputs (jaxmodels.inputs.Inputs): its `valid` tokens count in
        the routing statistics, its options choose the kernels and the mesh. Returns (y [b, s, hidden],
        router_stats {"load", "score"} [b, experts])."""
        cfg, options = self.cfg, inputs.options
        b, s, d = x.shape
        with jax.named_scope("moe"):
            flat = x.reshape(b * s, d)
            bias = None if self.gate.e_score_correction_bias is None else self.gate.e_score_correction_bias[...]
            with jax.named_scope("router"):
                weights, ids, scores = route(cfg, self.gate.logits(flat), bias)
                stats = router_stats(ids.reshape(b, s, -1), scores.reshape(b, s, -1), inputs.valid,
                                     cfg.n_routed_experts)
            with jax.named_scope("experts"):
                # Weights are cast to the activations' dtype where they are used (bf16 compute, float32 master).
                experts = tuple(w.astype(x.dtype) for w in self.experts.weights())
                if options.mesh is None:
                    y = grouped_experts(flat, ids, weights, *experts, cfg.hidden_act, options)
                else:
                    y = expert_parallel(flat, ids, weights, *experts, cfg.hidden_act, options)
            y = y.reshape(b, s, d)
            if self.shared_experts is not None:
                y = y + self.shared_experts(x)
            return y, stats
