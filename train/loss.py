"""Losses: next-token cross-entropy (chunked over the sequence), DeepSeek-V3's multi-token-prediction (MTP) loss
terms, classification losses, MoE balance losses. One cross-entropy (`token_cross_entropy`) and one IGNORE.

`lm_loss` is the contract: transformers' `model(input_ids, attention_mask=..., labels=labels).loss` —
labels **unshifted** (`labels[t]` is the token at t, -100 = ignored), the loss predicts labels[t + 1] from
position t and averages over the counted targets.

The vocabulary projection and its log-softmax run one sequence chunk at a time under `jax.checkpoint`, so
neither the forward nor the backward pass ever holds float32 logits for the whole [batch, seq, vocab].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmodels.layers import vocab as vocab_lib
from jaxmodels.layers.mtp import mtp_hidden, shift_left

IGNORE = -100  # label of a position the loss skips (transformers' ignore_index): the one definition

# Largest float32 logits block (elements) computed at once on one device: [rows per device, chunk, vocab] <= this.
CHUNK_ELEMENTS = 2**26


def shift_labels(labels: jax.Array) -> jax.Array:
    """[b, s] unshifted labels -> [b, s] targets: target[t] = labels[t + 1], the last one ignored."""
    return jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE)], axis=1)


def chunk_len(seq: int, per_position: int, chunk_elements: int) -> int:
    """The largest divisor of seq whose block of per_position elements per position fits chunk_elements."""
    want = max(1, chunk_elements // max(1, per_position))
    if want >= seq:
        return seq
    return max(c for c in range(1, want + 1) if seq % c == 0)


def token_cross_entropy(model, h: jax.Array, targets: jax.Array, *, chunk_elements: int = CHUNK_ELEMENTS):
    """Summed cross-entropy of the model's vocabulary head over h [b, s, hidden] against targets [b, s]
    (IGNORE = not counted). Returns (sum of losses float32, number of counted targets int32, number of
    targets the head ranks first (argmax == target) int32).

    On a mesh the head runs vocabulary-parallel (jaxmodels.layers.vocab.cross_entropy: no device gathers the
    whole head, each computes the logits of its vocabulary slice for every row of a chunk)."""
    b, s, d = h.shape
    vocab = model.config.vocab_size
    weight = model.head_weight() if hasattr(model, "head_weight") else None
    axes = vocab_lib.sharded_head(model.options, b, vocab) if weight is not None else ()
    if axes:  # every device: all b rows of a chunk (gathered) and its vocabulary slice of their logits
        per_position = b * max(vocab // vocab_lib.ways(model.options, axes), d)
    else:  # every device: its rows (a mesh splits the batch) and the whole vocabulary
        split = vocab_lib.batch_axes(model.options.mesh, model.options.rules, b)
        per_position = -(-b // vocab_lib.ways(model.options, split)) * vocab
    c = chunk_len(s, per_position, chunk_elements)
    if not model.options.scan and s // c > 2 and s % 2 == 0:  # XLA's cost programs (below): the same work in 2
        c = s // 2
    n = s // c

    @jax.checkpoint  # the backward pass recomputes each chunk's logits instead of keeping them
    def chunk(carry, xs):
        hc, tc = xs  # [b, c, hidden], [b, c]
        if axes:
            loss, counted, correct = vocab_lib.cross_entropy(hc, weight, tc, IGNORE, model.options)
        else:
            loss, counted, correct = vocab_lib.softmax_cross_entropy(model.logits(hc).astype(jnp.float32), tc,
                                                                     IGNORE)
        total, count, right = carry
        return (total + loss, count + counted, right + correct), None

    hs = h.reshape(b, n, c, d).swapaxes(0, 1)  # [chunks, b, c, hidden]
    ts = targets.reshape(b, n, c).swapaxes(0, 1)  # [chunks, b, c]
    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
    # Unrolled with the model's layers (Options.scan False: the programs XLA's cost analysis prices, which counts a
    # loop body once; jaxmodels.pods.estimate_cost).
    (total, count, right), _ = jax.lax.scan(chunk, init, (hs, ts), unroll=not model.options.scan)
    return total, count, right


def lm_loss(model, input_ids, labels, attention_mask=None):
    """Mean next-token cross-entropy over labels != -100; labels unshifted, exactly as transformers takes
    them. input_ids, labels [b, s] int; attention_mask [b, s] (1 = token, 0 = padding) or None.
    Equal to transformers' `model(input_ids, attention_mask=attention_mask, labels=labels).loss`."""
    h = model.hidden(jnp.asarray(input_ids), attention_mask)
    total, count, _ = token_cross_entropy(model, h, shift_labels(jnp.asarray(labels)))
    return total / jnp.maximum(count, 1)


def mtp_targets(labels, depth: int, segment_ids=None):
    """Targets [b, s] of MTP depth `depth` (0-based) from *unshifted* labels [b, s] (IGNORE = not counted):
    index i predicts labels[i + depth + 2]; targets that run off the row or cross a document boundary of
    a packed row (segment_ids differ) are IGNORE."""
    n = depth + 2
    t = shift_left(jnp.asarray(labels), n, IGNORE)
    if segment_ids is not None:
        seg = jnp.asarray(segment_ids)
        t = jnp.where((shift_left(seg, n, -1) == seg) & (seg != 0), t, IGNORE)
    return t


def mtp_loss_terms(model, h_main, batch):
    """Per-depth cross-entropy sums of the MTP heads (jaxmodels.layers.mtp), for a trainer that adds
    lambda x mean MTP CE.

    batch: {"input_ids" [b, s], "labels" [b, s] unshifted (IGNORE = not counted; default input_ids),
    and "segment_ids" [b, s] (packed) or "attention_mask" [b, s]; optional "positions"}. h_main: the main
    model's final-normed output for that batch (`model.hidden(...)`, the same call the LM loss uses).
    Returns a list (one per depth d, predicting token i + d + 2 at index i) of `token_cross_entropy`'s
    (summed CE float32, counted targets int32, targets ranked first int32); right / count is the head's top-1
    accuracy: with greedy decoding, the draft acceptance rate.
    """
    ids = jnp.asarray(batch["input_ids"])
    labels = jnp.asarray(batch.get("labels", ids))
    seg = batch.get("segment_ids")
    am = batch.get("attention_mask")
    if am is not None and seg is None:
        labels = jnp.where(jnp.asarray(am) != 0, labels, IGNORE)
    hs = mtp_hidden(model, h_main, ids, batch.get("positions"), None if seg is not None else am, seg)
    out = []
    for d, h in enumerate(hs):
        t = mtp_targets(labels, d, seg)
        if am is not None and seg is None:  # a padding position's hidden state predicts nothing
            t = jnp.where(jnp.asarray(am) != 0, t, IGNORE)
        out.append(token_cross_entropy(model, h, t))
    return out


def classification_loss(model, logits: jax.Array, labels: jax.Array):
    """transformers' rule for the classification heads: num_labels == 1 is regression (MSE), otherwise
    cross-entropy over labels != -100. logits [b, labels] or [b, s, labels]. Returns (sum, count)."""
    logits = logits.astype(jnp.float32)
    if model.config.num_labels == 1:
        err = jnp.square(logits[..., 0] - labels.astype(jnp.float32))
        return err.sum(), jnp.asarray(err.size, jnp.int32)
    mask = labels != IGNORE
    safe = jnp.where(mask, labels, 0)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, safe[..., None], -1)[..., 0]
    return jnp.where(mask, nll, 0.0).sum(), mask.sum().astype(jnp.int32)


def balance_loss(stats: dict, valid: jax.Array, top_k: int, *, per_sequence: bool) -> jax.Array:
    """DeepSeek's expert-balance loss summed over MoE layers (multiply by its alpha).

    stats: router statistics from the forward pass, "load" (token-slots per expert) and "score" (summed
    router probabilities), each [layers, b, experts]; valid [b, s] bool. Per layer, with T tokens,
    f_i = E / (K T) * load_i and P_i = score_i / T, the loss is sum_i f_i P_i: per sequence and averaged
    over the batch (DeepSeek-V2 `seq_aux`, DeepSeek-V3's sequence-wise loss) or over the whole batch at once.
    """
    load, score = stats["load"], stats["score"]  # [L, b, E]
    e = load.shape[-1]
    tokens = valid.sum(-1).astype(jnp.float32)  # [b]
    if per_sequence:
        t = jnp.maximum(tokens, 1.0)[None, :, None]
        f = load * e / (top_k * t)
        p = score / t
        return (f * p).sum(-1).mean(-1).sum()
    t = jnp.maximum(tokens.sum(), 1.0)
    f = load.sum(1) * e / (top_k * t)  # [L, E]
    p = score.sum(1) / t
    return (f * p).sum()
