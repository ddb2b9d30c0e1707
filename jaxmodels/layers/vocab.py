"""The vocabulary's two ends on a mesh, without the whole table on any device.

Under FSDP the embedding table and the output head [vocab, hidden] are split over the devices that split the
batch. Left to the compiler, the lookup and the logits all-gather the whole table on every device, and the
head's gradient is all-reduced whole once per loss chunk: on a pod that is several full [vocab, hidden] copies
per chip (DeepSeek-V3 on a v5p-256: 5 x 1.73 GiB of its 94 GiB, `jaxmodels plan --compile`). Here, inside
`shard_map` over the batch's mesh axes (E):

* `lookup`: every device gathers the (small) token ids of the whole batch, looks up its own slice of the hidden
  dimension for all of them, and one all-to-all hands each device its rows with the full hidden width;
* `cross_entropy`: vocabulary-parallel. The head is taken split over its vocabulary rows; every device gathers
  the hidden states of the chunk (all rows), computes the logits of its vocabulary slice, and the log-sum-exp,
  the target's logit and the argmax are combined over E with scalar-per-token collectives. The head's
  gradient stays on its device, already split; the hidden states' gradient is reduce-scattered back.

Both return the same values as the single-device code (`jnp.take`, `logsumexp`), which they fall back to without
a mesh, or when E does not divide the dimensions they split.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxmodels import sharding


def batch_axes(mesh, rules, batch: int) -> tuple[str, ...]:
    """The mesh axes (of size > 1) a batch of `batch` rows is split over on `mesh` (a Mesh or {axis: size}) under
    the rules table; () without a mesh."""
    if mesh is None:
        return ()
    spec = sharding.trim_spec(sharding.logical_to_spec(("batch",), rules, mesh, (batch,)), mesh)
    return sharding.mesh_axes_of_spec(spec, 0)


def ways(options, axes) -> int:
    """Devices along `axes` of options' mesh (1 for none)."""
    if not axes:
        return 1
    return math.prod(options.mesh.shape[a] for a in axes)


def lookup(table: jax.Array, ids: jax.Array, dtype, options) -> jax.Array:
    """table [vocab, hidden], ids [batch, seq] -> [batch, seq, hidden] in dtype: `jnp.take(table, ids, 0)`."""
    axes = batch_axes(getattr(options, "mesh", None), getattr(options, "rules", None), ids.shape[0])
    hidden = table.shape[1]
    if not axes or hidden % ways(options, axes):
        return jnp.take(table, ids, axis=0).astype(dtype)
    P = jax.sharding.PartitionSpec

    def local(table, ids):  # table [vocab, hidden / E], ids [batch / E, seq]
        every = jax.lax.all_gather(ids, axes, axis=0, tiled=True)  # [batch, seq]
        cols = jnp.take(table, every, axis=0).astype(dtype)  # [batch, seq, hidden / E]: my columns, every row
        return jax.lax.all_to_all(cols, axes, 0, 2, tiled=True)  # [batch / E, seq, hidden]: my rows, all columns

    return jax.shard_map(local, mesh=options.mesh, in_specs=(P(None, axes), P(axes, None)),
                         out_specs=P(axes, None, None))(table, ids)


def sharded_head(options, batch: int, vocab: int) -> tuple[str, ...]:
    """The axes `cross_entropy` splits the vocabulary over for this batch, or () when it falls back."""
    axes = batch_axes(getattr(options, "mesh", None), getattr(options, "rules", None), batch)
    return axes if axes and vocab % ways(options, axes) == 0 else ()


def cross_entropy(h: jax.Array, weight: jax.Array, targets: jax.Array, ignore: int, options):
    """Summed cross-entropy of logits = h @ weight.T against targets, and counts. h [b, c, hidden] (compute
    dtype), weight [vocab, hidden], targets [b, c] (`ignore` = not counted) -> (loss sum float32, counted int32,
    argmax == target int32), the same on every device."""
    axes = sharded_head(options, h.shape[0], weight.shape[0])
    if not axes:
        logits = jnp.einsum("bcd,vd->bcv", h, weight.astype(h.dtype)).astype(jnp.float32)
        return softmax_cross_entropy(logits, targets, ignore)
    P = jax.sharding.PartitionSpec

    rows = h.shape[0] // ways(options, axes)

    def local(h, weight, targets):  # h [b / E, c, hidden], weight [vocab / E, hidden], targets [b / E, c]
        h = jax.lax.all_gather(h, axes, axis=0, tiled=True)  # [b, c, hidden]
        targets = jax.lax.all_gather(targets, axes, axis=0, tiled=True)
        logits = jnp.einsum("bcd,vd->bcv", h, weight.astype(h.dtype)).astype(jnp.float32)  # my vocabulary slice
        width = logits.shape[-1]
        first = jax.lax.axis_index(axes) * width
        top = jax.lax.stop_gradient(logits.max(axis=-1))
        peak = jax.lax.pmax(top, axes)
        lse = jnp.log(jax.lax.psum(jnp.exp(logits - peak[..., None]).sum(axis=-1), axes)) + peak
        mask = targets != ignore
        index = jnp.where(mask, targets, 0) - first
        mine = (index >= 0) & (index < width)
        picked = jnp.take_along_axis(logits, jnp.clip(index, 0, width - 1)[..., None], axis=-1)[..., 0]
        picked = jax.lax.psum(jnp.where(mine, picked, 0.0), axes)
        loss = jnp.where(mask, lse - picked, 0.0)
        # argmax over the whole vocabulary: the smallest index holding the maximum, as jnp.argmax picks it
        best = jnp.where(top == peak, first + jnp.argmax(logits, axis=-1), jnp.iinfo(jnp.int32).max)
        correct = mask & (jax.lax.pmin(best, axes) == jnp.where(mask, targets, 0))

        def total(x):  # every device has every row's figure: each sums its own rows, then all of them add up
            mine = jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(axes) * rows, rows, axis=0)
            return jax.lax.psum(mine.sum(dtype=x.dtype if x.dtype == jnp.float32 else jnp.int32), axes)

        return total(loss), total(mask), total(correct)

    return jax.shard_map(local, mesh=options.mesh, in_specs=(P(axes, None, None), P(axes, None), P(axes, None)),
                         out_specs=(P(), P(), P()))(h, weight, targets)


def softmax_cross_entropy(logits, targets, ignore):
    """(loss sum, counted, argmax == target) of float32 logits [..., vocab] against targets [...]."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    mask = targets != ignore
    safe = jnp.where(mask, targets, 0)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    loss = jnp.where(mask, lse - picked, 0.0).sum()
    correct = (mask & (jnp.argmax(logits, axis=-1) == safe)).sum()
    return loss, mask.sum(), correct
