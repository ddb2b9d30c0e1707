"""A stack of identical layers: parameters with a leading `layers` axis, run as one loop (lax.scan)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.layers.attention import ATTENTION_OUTPUT, ATTENTION_RESIDUALS
from jaxmodels.options import REMAT_NAMES

# Rematerialisation of the layer scan body (Options.remat): what the backward pass keeps from the forward.
REMAT_POLICIES = {
    "none": None,  # keep every intermediate (fastest, most memory)
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input; recompute the layer
    # keep the projections' outputs (matmuls without batch dims); recompute attention, norms, activations
    "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_all_dots": jax.checkpoint_policies.checkpoint_dots,  # also attention scores: more memory
    # keep what attention's backward kernel reads (q, k, v, output, softmax statistics) and its output; recompute
    # the norms, o_proj and the MLP. Between "full" and "save_matmuls" in memory, and unlike both it never runs
    # the attention forward kernel again (benchmarks/RESULTS.md: stablelm-3b 8x1024 compiled for an H100).
    "lean": jax.checkpoint_policies.save_only_these_names(ATTENTION_RESIDUALS, ATTENTION_OUTPUT),
}
assert tuple(REMAT_POLICIES) == REMAT_NAMES


class LayerStack(nnx.Module):
    """`num_layers` copies of one layer, parameters stacked on a leading axis, run with lax.scan. `offset`: the
    checkpoint index of its first layer (`model.layers.{offset + i}`)."""

    def __init__(self, make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs,
                 offset: int = 0):
        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(r):
            return make_layer(r)

        self.layers = create(rngs)
        self.num_layers = num_layers
        self.offset = offset
        for _, var in nnx.iter_graph(self.layers):
            if isinstance(var, nnx.Variable):
                var.set_metadata("axes", ("layers",) + tuple(var.get_metadata().get("axes", ())))

    def layer(self, i: int) -> nnx.Module:
        """Layer i of the stack as a module of its own (its parameters sliced out of the stack)."""
        graphdef, state = nnx.split(self.layers)
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))

    def __call__(self, x, inputs, cache=None, **layer_kw):
        """x [batch, seq, hidden]; inputs: jaxmodels.inputs.Inputs (its options choose scan and remat); cache:
        this stack's static cache (jaxmodels.cache, buffers with a leading layers axis) or None; layer_kw: passed
        to every layer. Returns (x, updated cache, per-layer router stats [layers, ...] or None).

        The cache rides in the loop's carry and each layer writes only its new slots in place, so a decode
        loop never re-stacks (copies) the whole cache. Router statistics leave the scan as its outputs; with a
        cache (generation) the layers run as a while loop counted by the cache's `layer` and return none.
        """
        options = inputs.options
        scan = options.scan
        graphdef, state = nnx.split(self.layers)

        def body(carry, xs):
            h, c = carry
            layer_state, i = xs
            layer = nnx.merge(graphdef, layer_state)
            h, c, stats = layer(h, inputs, None if c is None else c.at_layer(i), **layer_kw)
            return (h, c), stats

        if options.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[options.remat], prevent_cse=not scan)
        if scan and cache is not None:
            # Generation (never differentiated; router statistics unused): a while loop whose only counter is
            # the cache's layer index. A scan has its own counter and slices each layer's index out of
            # `layer_ids`: one more kernel per layer on a GPU (benchmarks/count_kernels.py).
            def step(carry):
                h, c = carry
                i = c.layer
                layer_state = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), state)
                (h, c), _ = body((h, c), (layer_state, i))
                return h, c.at_layer(i + 1)

            x, cache = jax.lax.while_loop(lambda carry: carry[1].layer < self.num_layers, step,
                                          (x, cache.at_layer(0)))
            return x, cache, None
        layer_ids = jnp.arange(self.num_layers, dtype=jnp.int32)
        if scan:
            (x, cache), stats = jax.lax.scan(body, (x, cache), (state, layer_ids))
        else:
            per_layer = []
            for i in range(self.num_layers):
                (x, cache), st = body((x, cache), (jax.tree.map(lambda a: a[i], state), layer_ids[i]))
                per_layer.append(st)
            stats = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
        return x, cache, stats
