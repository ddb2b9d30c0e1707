"""The training step: one jitted pure function `(state, batch) -> (state, metrics)`.

The model is split once into its graph definition and three states: the trainable parameters (all
`nnx.Param`s, or only the LoRA adapters), the frozen parameters (the LoRA base; empty otherwise) and the
buffers (DeepSeek-V3's routing bias). The loss runs the same scanned decoder inference uses, through
`nnx.merge` inside the jitted function.

Gradient accumulation runs the K micro-batches of a step with `lax.scan` and divides the summed token
losses by the step's total number of counted targets, so K micro-batches of B rows give exactly the
gradient of one batch of K x B rows. The routing bias is updated after the optimizer step from the router
loads the forward pass returns; it never sees a gradient.

Shardings come from the one rules table: parameters by their logical axes, the optimizer state as its
parameters (it is created from them), the batch over the table's batch axes. Nothing here knows the mesh's
shape.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from jaxmodels import distributed, sharding
from jaxmodels.config import DeepseekConfig
from jaxmodels.layers.mtp import num_mtp_layers
from jaxmodels.train.loss import (IGNORE, balance_loss, classification_loss, mtp_loss_terms, mtp_targets, shift_labels,
                                  token_cross_entropy)
from jaxmodels.train.optim import update_routing_bias

BIAS_NAME = "e_score_correction_bias"

# XLA options of the compiled train step: none by default. IN_PLACE_OPTIONS are the candidate that removes most
# of the step's copies (benchmarks/RESULTS.md, `count_kernels.py --train`): cuBLAS GEMMs instead of Triton's, which
# dynamic-slice fusion lets read each layer's weights and residuals out of the stacked buffers, and write the
# per-layer residuals and gradients into them, in place. Not the default until it is timed on a GPU
# (`bench_train.py --xla-options in_place`).
COMPILER_OPTIONS: dict = {}
IN_PLACE_OPTIONS = {"xla_gpu_enable_dynamic_slice_fusion": True, "xla_gpu_enable_triton_gemm": False}
XLA_OPTION_SETS = {"default": COMPILER_OPTIONS, "in_place": IN_PLACE_OPTIONS}


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Static choices of the step (hashable: they are baked into the compiled function)."""

    task: str = "causal_lm"  # the model head: causal_lm | sequence_classification | token_classification
    aux_loss_alpha: float = 0.0  # expert-balance loss weight (0: off)
    seq_aux: bool = True  # balance loss per sequence (DeepSeek-V2 seq_aux, V3) or over the batch
    bias_update_rate: float = 0.0  # DeepSeek-V3 aux-loss-free balancing (0: off)
    mtp_loss_weight: float = 0.0  # lambda x mean multi-token-prediction cross-entropy over depths (0: off)


def split_model(model, trainable_filter=nnx.Param):
    """(graphdef, trainable, frozen, buffers): the trainable variables, the other Params, everything else."""
    graphdef, trainable, frozen, buffers = nnx.split(model, trainable_filter, nnx.Param, ...)
    return graphdef, trainable, frozen, buffers


def _forward(model, batch: dict, opts: StepOptions):
    """Loss pieces of one micro-batch: (summed loss, counted targets, correct targets, router stats, valid,
    MTP terms: [(summed CE, counted targets, top-1 right) per depth] or [])."""
    if opts.task == "causal_lm":
        seg = batch["segment_ids"]
        h, stats = model.hidden(batch["input_ids"], positions=batch["positions"], segment_ids=seg, return_stats=True)
        total, count, correct = token_cross_entropy(model, h, shift_labels(batch["labels"]))
        mtp = mtp_loss_terms(model, h, batch) if opts.mtp_loss_weight else []
        return total, count, correct, stats, seg != 0, mtp
    mask = batch["attention_mask"]
    h, stats = model.hidden(batch["input_ids"], mask, return_stats=True)
    logits = model.head_output(h, batch["input_ids"])
    total, count = classification_loss(model, logits, batch["labels"])
    correct = jnp.zeros((), jnp.int32)
    if model.config.num_labels > 1:
        labels = batch["labels"]
        correct = ((jnp.argmax(logits, -1) == labels) & (labels != IGNORE)).sum()
    return total, count, correct, stats, mask != 0, []


def count_targets(batch: dict, task: str, num_labels: int) -> jax.Array:
    """Targets the loss averages over (computed from labels alone, before the forward pass)."""
    labels = batch["labels"]
    if task == "causal_lm":
        return (shift_labels(labels.reshape(-1, labels.shape[-1])) != IGNORE).sum()
    if num_labels == 1:
        return jnp.asarray(labels.size, jnp.int32)
    return (labels != IGNORE).sum()


def count_mtp_targets(batch: dict, depth: int) -> jax.Array:
    """Targets of MTP depth `depth` in a batch [micro-batches, rows, seq] (see jaxmodels.layers.mtp)."""
    flat = {k: batch[k].reshape(-1, batch[k].shape[-1]) for k in ("labels", "segment_ids")}
    return (mtp_targets(flat["labels"], depth, flat["segment_ids"]) != IGNORE).sum()


def _path_names(path) -> list[str]:
    """The names along a pytree path of an nnx state (dict keys / attribute names)."""
    return [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]


def _set_bias(buffers, update):
    """The buffers with the main MoE stack's routing bias [moe layers, experts] replaced by update(old).
    (An MTP layer's own router keeps its bias: its loads are not part of the main forward's statistics.)"""
    def one(path, x):
        names = _path_names(path)
        return update(x) if BIAS_NAME in names and "moe_layers" in names else x
    return jax.tree_util.tree_map_with_path(one, buffers)


# Parameters the forward pass does not simply cast to the compute dtype where it uses them: the router's
# weight (logits in float32), the token embeddings (a bf16 table would sum its gradient over repeated tokens
# in bf16), LayerNorm weights (StableLM's norms scale in float32) and LoRA adapters (their delta is formed
# in float32). A leaf is kept when a name on its path is "gate" or contains one of the substrings.
_KEEP_NAME, _KEEP_SUBSTRINGS = "gate", ("embed_tokens", "norm", "lora")


def compute_params(params, compute_dtype):
    """The parameters as the forward pass uses them: float32 master weights cast once to the compute dtype.

    The layers cast each weight to the activations' dtype where they use it, so casting the whole stacked
    tree once, before the layer scan, computes the same values and gradients (the gradient of a cast is a
    cast back; tested: bitwise for StableLM, within bf16 rounding for the routed experts on CPU). What it
    saves is per-layer work inside the scan: a cast of every layer's slice in the forward and again in the
    backward, copies of the float32 slices, and float32 per-layer gradient writes (the scan writes bf16
    gradients; they become float32 once, where the optimizer reads them).
    Leaves matched by _KEEP_NAME / _KEEP_SUBSTRINGS and non-float32 leaves are left as they are.
    """
    if compute_dtype is None or jnp.dtype(compute_dtype) == jnp.float32:
        return params

    def one(path, x):
        keep = x.dtype != jnp.float32 or any(n == _KEEP_NAME or any(k in n for k in _KEEP_SUBSTRINGS)
                                             for n in _path_names(path))
        return x if keep else x.astype(compute_dtype)
    return jax.tree_util.tree_map_with_path(one, params)


def train_step(graphdef, tx, opts: StepOptions, state: dict, frozen, batch: dict):
    """state {"params", "opt_state", "buffers", "step"}; batch: arrays [micro-batches, rows, ...].
    Returns (new state, metrics dict of scalars and router loads)."""
    params, buffers = state["params"], state["buffers"]
    whole = nnx.merge(graphdef, params, frozen, buffers)  # for static facts: config, MTP depth
    cfg = whole.config
    n_targets = jnp.maximum(count_targets(batch, opts.task, cfg.num_labels), 1).astype(jnp.float32)
    k = next(iter(batch.values())).shape[0]
    depths = num_mtp_layers(whole) if opts.mtp_loss_weight else 0
    # Each depth's CE is averaged over the whole step's targets of that depth (exact under accumulation).
    n_mtp = [jnp.maximum(count_mtp_targets(batch, d), 1).astype(jnp.float32) for d in range(depths)]

    def micro_loss(p, micro):
        model = nnx.merge(graphdef, compute_params(p, whole.options.dtype), frozen, buffers)
        total, count, correct, stats, valid, mtp = _forward(model, micro, opts)
        objective = total / n_targets
        if mtp:
            objective += opts.mtp_loss_weight * sum(t / n for (t, _, _), n in zip(mtp, n_mtp)) / len(mtp)
        mtp_sums = jnp.asarray([[t, c, r] for t, c, r in mtp], jnp.float32).reshape(len(mtp), 3)
        aux = jnp.zeros((), jnp.float32)
        if stats is not None and opts.aux_loss_alpha:
            aux = opts.aux_loss_alpha * balance_loss(stats, valid, cfg.num_experts_per_tok,
                                                     per_sequence=opts.seq_aux) / k
        load = None if stats is None else stats["load"].sum(1)  # [moe layers, experts]
        return objective + aux, (total, count, correct, aux, load, mtp_sums)

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def accumulate(carry, micro):
        grads, total, count, correct, aux, load, mtp = carry
        g, (t, c, r, a, l, m) = grad_fn(params, micro)
        grads = jax.tree.map(jnp.add, grads, g)
        load = None if l is None else load + l
        return (grads, total + t, count + c, correct + r, aux + a, load, mtp + m), None

    if k == 1:  # no accumulator: one gradient buffer fewer
        grads, (total, count, correct, aux, load, mtp) = grad_fn(params, jax.tree.map(lambda x: x[0], batch))
    else:
        zeros = jax.tree.map(jnp.zeros_like, params)
        load0 = None
        if isinstance(cfg, DeepseekConfig) and cfg.num_moe_layers:
            load0 = jnp.zeros((cfg.num_moe_layers, cfg.n_routed_experts), jnp.float32)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32),
                jnp.zeros((), jnp.float32), load0, jnp.zeros((depths, 3), jnp.float32))
        (grads, total, count, correct, aux, load, mtp), _ = jax.lax.scan(accumulate, init, batch)

    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    if load is not None and opts.bias_update_rate:
        buffers = _set_bias(buffers, lambda b: update_routing_bias(b, load, opts.bias_update_rate))
    metrics = {"loss": total / jnp.maximum(count, 1), "aux_loss": aux, "grad_norm": grad_norm,
               "tokens": count, "accuracy": correct / jnp.maximum(count, 1)}
    if load is not None:
        metrics["expert_load"] = load
    if depths:  # per depth: mean CE and top-1 accuracy (= the greedy draft acceptance rate)
        metrics["mtp_loss"] = mtp[:, 0] / jnp.maximum(mtp[:, 1], 1)
        metrics["mtp_accuracy"] = mtp[:, 2] / jnp.maximum(mtp[:, 1], 1)
    new_state = {"params": params, "opt_state": opt_state, "buffers": buffers, "step": state["step"] + 1}
    return new_state, metrics


def eval_step(graphdef, opts: StepOptions, state: dict, frozen, batch: dict):
    """Summed loss, counted targets and correct targets of one batch [rows, ...] (no gradient)."""
    model = nnx.merge(graphdef, state["params"], frozen, state["buffers"])
    total, count, correct, _, _, mtp = _forward(model, batch, opts)
    out = {"loss_sum": total, "tokens": count, "correct": correct}
    if mtp:
        out["mtp"] = jnp.asarray([[t, c, r] for t, c, r in mtp], jnp.float32)  # [depths, (sum, count, right)]
    return out


# ----------------------------------------------------------------------------------------------------
# Placement
# ----------------------------------------------------------------------------------------------------

def process_shard(mesh, rows: int, micro: bool):
    """The Grain `ShardOptions` of the rows of a `rows`-row batch that this process's devices hold (shard 0
    of 1 on one process); `TrainData.batch(..., shard=)` reads just those, `sharding.shard_batch(..., rows=)`
    places them."""
    shape = (1, rows) if micro else (rows,)
    return distributed.batch_shard(sharding.batch_sharding(mesh, shape, micro=micro), shape, len(shape) - 1)


def check_batch_fits_mesh(rows: int, mesh) -> None:
    """The rows of a micro-batch must split evenly over the mesh's batch axes."""
    from jaxmodels.train.config import TrainError
    axes = sharding.mesh_axes_of("batch", None, mesh)
    ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if rows % ways:
        raise TrainError(f"--batch-size {rows} does not split over the mesh's batch axes {axes} ({ways} ways); "
                         f"use a multiple of {ways} or a mesh with fewer data/fsdp/expert devices")


def opt_state_shardings(tx, params, other) -> Any:
    """Shardings of tx's state for `params` (arrays or ShapeDtypeStructs carrying shardings): every copy of the
    parameter tree inside it (AdamW's mu and nu) placed like the parameters, everything else (counts) `other`.
    jit(tx.init) alone does not do this: zeros_like does not follow its input's sharding, and the compiler
    replicated the moments (all of DeepSeek-V3's AdamW state on every chip)."""
    abstract = jax.eval_shape(tx.init, params)
    return optax.tree_map_params(tx, lambda _, p: p.sharding, abstract, params,
                                 transform_non_params=lambda _: other)


def abstract_opt_state(tx, params, other) -> Any:
    """tx's state for abstract `params` as ShapeDtypeStructs placed by `opt_state_shardings`."""
    abstract = jax.eval_shape(tx.init, params)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                        opt_state_shardings(tx, params, other))


def init_state(params, buffers, tx, mesh=None) -> dict:
    """The train state on the parameters' devices: the optimizer state created from and placed like them."""
    if mesh is None:
        opt_state = jax.jit(tx.init)(params)
    else:
        replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
        opt_state = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, params, replicated))(params)
    state = {"params": params, "opt_state": opt_state, "buffers": buffers, "step": jnp.zeros((), jnp.int32)}
    if mesh is None:
        return state
    # Commit every leaf (uncommitted ones, e.g. the step counters, replicated on the mesh): the jitted step
    # returns committed arrays, so an uncommitted first input would compile the step a second time.
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding if x.committed else replicated), state)


def compile_steps(graphdef, tx, opts: StepOptions, state, frozen, compiler_options: dict | None = None):
    """Jitted train and eval steps whose outputs stay where the state lives (the state is donated).
    compiler_options: XLA options of the train step (default COMPILER_OPTIONS)."""
    shardings = jax.tree.map(lambda x: x.sharding, state)  # where each leaf lives now
    options = dict(COMPILER_OPTIONS if compiler_options is None else compiler_options)
    step = jax.jit(functools.partial(train_step, graphdef, tx, opts), donate_argnums=(0,),
                   out_shardings=(shardings, None), compiler_options=options)
    evaluate = jax.jit(functools.partial(eval_step, graphdef, opts))
    return step, evaluate
