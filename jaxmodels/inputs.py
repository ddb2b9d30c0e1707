"""The one forward-input object: what a forward pass is given besides the tokens, built in one place.

`Inputs` holds the queries' rope positions and documents (segment ids, 0 = padding), the keys' documents
when attending over a cache, the cache slot the queries are written to, the mode (train / prefill / decode),
whether attention is causal, and the model's static `Options`. Every caller builds it here (`forward_inputs`
for a full pass from what a user gives: attention_mask, positions, segment_ids; `prefill_inputs` and
`decode_inputs` for generation) and every layer takes `(x, inputs, cache)`.

Masks are not passed between layers. The attention kernels read the segment form (cuDNN's causal/segment
form, splash's SegmentIds); only the XLA fallback and the absorbed decode build the dense [b, s, t] mask,
with `Inputs.dense_mask`, inside attention.

Semantics (one rule for every mode): query i may attend key j when both lie in the same document, the key is
not padding (segment 0) and, causally, j's cache slot is not after i's. A padding query therefore attends
nothing (its output is finite and meant to be ignored).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxmodels.options import Options

MODES = ("train", "prefill", "decode")


@struct.dataclass
class Inputs:
    """positions [b, s] int32: rope positions of the queries. segment_ids [b, s] int32: each query's document
    (1, 2, ...; 0 = padding). kv_segment_ids [b, T] int32 or None: the documents of the cache slots a decode
    step attends to (None: the keys are the queries' own row, self-attention). cache_index: int32 scalar or
    [b], the cache slot of the first query (where it is written; decode and prefill), None without a cache.
    mode (static): "train" (full pass, possibly differentiated), "prefill" (full pass writing an empty cache)
    or "decode" (a few tokens attending over the cache). read_len (static): the cache slots a decode step
    reads (None: all). options (static): the model's Options. cos, sin [b, s, rope_dim]: the rope tables of the
    positions, filled in by the decoder (`with_rope`) so every layer reads the same tables."""

    positions: jax.Array
    segment_ids: jax.Array
    kv_segment_ids: jax.Array | None = None
    cache_index: jax.Array | None = None
    cos: jax.Array | None = None
    sin: jax.Array | None = None
    mode: str = struct.field(pytree_node=False, default="train")
    causal: bool = struct.field(pytree_node=False, default=True)
    read_len: int | None = struct.field(pytree_node=False, default=None)
    options: Options = struct.field(pytree_node=False, default=Options())

    def with_rope(self, cfg) -> "Inputs":
        """These inputs with the rope tables of `cfg` (a model config) at their positions."""
        from jaxmodels.layers.rope import rope_tables
        cos, sin = rope_tables(cfg.rope, cfg.rope_head_dim, cfg.max_position_embeddings, self.positions)
        return self.replace(cos=cos, sin=sin)

    @property
    def valid(self) -> jax.Array:
        """[b, s] bool: the tokens that count (router statistics)."""
        return self.segment_ids != 0

    @property
    def decoding(self) -> bool:
        return self.mode == "decode"

    def key_segments(self, t: int) -> jax.Array:
        """[b, t] documents of the t keys attended to."""
        if self.kv_segment_ids is None:
            if t != self.segment_ids.shape[1]:
                raise ValueError(f"{t} keys but {self.segment_ids.shape[1]} queries and no kv_segment_ids")
            return self.segment_ids
        return self.kv_segment_ids[:, :t]

    def dense_mask(self, t: int) -> jax.Array:
        """[b, s, t] bool, True = may attend: the XLA attention fallback's (and absorbed decode's) form."""
        q_seg, kv_seg = self.segment_ids, self.key_segments(t)
        mask = (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] != 0)  # [b, s, t]
        if not self.causal:
            return mask
        s = q_seg.shape[1]
        q_slot = jnp.arange(s, dtype=jnp.int32)[None]  # [1, s]: self-attention over the row
        if self.decoding:  # queries sit at cache slots index, index + 1, ...
            q_slot = jnp.reshape(self.cache_index, (-1, 1)) + q_slot  # [b or 1, s]
        return mask & (jnp.arange(t, dtype=jnp.int32)[None, None, :] <= q_slot[:, :, None])


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """[b, s] int32: positions restarting at 0 at every document start of a packed row."""
    s = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), segment_ids.shape)
    start = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return idx - jax.lax.cummax(jnp.where(start, idx, 0), axis=1)


def check_inputs(input_ids, attention_mask=None, positions=None, segment_ids=None) -> None:
    """Clear errors for inputs a user can get wrong (shapes, dtypes, both masks)."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integers, got {input_ids.dtype}")
    for name, x in (("attention_mask", attention_mask), ("positions", positions), ("segment_ids", segment_ids)):
        if x is not None and tuple(jnp.shape(x)) != tuple(input_ids.shape):
            raise ValueError(f"{name} shape {tuple(jnp.shape(x))} != input_ids shape {tuple(input_ids.shape)}")
    if segment_ids is not None and attention_mask is not None:
        raise ValueError("pass attention_mask or segment_ids, not both: segment 0 already marks padding")


def forward_inputs(input_ids, attention_mask=None, positions=None, segment_ids=None, *,
                   options: Options = Options(), mode: str = "train") -> Inputs:
    """The Inputs of a full (uncached) forward pass from what a user gives.

    input_ids [b, s]; attention_mask [b, s] (1 = token, 0 = padding; positions then count from 0 regardless
    of padding, like transformers' forward) or segment_ids [b, s] (packed rows: documents 1, 2, ..., 0 =
    padding; positions restart per document); positions [b, s] overrides either default. Without both, every
    row is one unpadded document (the attention kernels then run plain causal attention).
    """
    input_ids = jnp.asarray(input_ids)
    check_inputs(input_ids, attention_mask, positions, segment_ids)
    b, s = input_ids.shape
    if segment_ids is not None:
        seg = jnp.asarray(segment_ids, jnp.int32)
        if positions is None:
            positions = segment_positions(seg)
    elif attention_mask is not None:
        seg = (jnp.asarray(attention_mask) != 0).astype(jnp.int32)
    else:
        seg = jnp.ones((b, s), jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    return Inputs(positions=jnp.asarray(positions, jnp.int32), segment_ids=seg, mode=mode, options=options)


def prompt_positions(mask: jax.Array) -> jax.Array:
    """transformers' position_ids for a (left-)padded prompt: cumsum(mask) - 1, padding set to 1."""
    pos = jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1
    return jnp.where(mask != 0, pos, 1)


def prefill_inputs(mask: jax.Array, options: Options = Options(), positions=None) -> Inputs:
    """A left-padded prompt's pass writing an empty cache from slot 0. mask [b, p] (0 = left padding): the
    prompt is one document (segment 1), padding segment 0; positions as transformers' generate counts them."""
    return Inputs(positions=prompt_positions(mask) if positions is None else positions,
                  segment_ids=(mask != 0).astype(jnp.int32), cache_index=jnp.zeros((), jnp.int32), mode="prefill",
                  options=options)


def decode_inputs(positions: jax.Array, kv_valid: jax.Array, index, options: Options = Options(),
                  read_len: int | None = None) -> Inputs:
    """s new tokens per row at rope positions [b, s], written to cache slots index .. index + s - 1 (index: a
    scalar or [b]), attending causally to the cache slots kv_valid [b, T] marks (False: prompt padding)."""
    index = jnp.asarray(index, jnp.int32)
    return Inputs(positions=positions, segment_ids=jnp.ones(positions.shape, jnp.int32),
                  kv_segment_ids=kv_valid.astype(jnp.int32), cache_index=index, mode="decode", read_len=read_len,
                  options=options)


__all__ = ["Inputs", "MODES", "forward_inputs", "prefill_inputs", "decode_inputs", "segment_positions",
           "prompt_positions", "check_inputs"]
