"""Sampling: transformers' logits filters (temperature, top-k, top-p) and token selection, as pure jax."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """transformers' order: temperature, then top-k, then top-p. logits [b, vocab] float32; removed
    tokens get -inf. top_k: a static int (0 = off), or a traced int [b] per row (0 = off; the batch engine);
    temperature and top_p: scalars or [b] per row, static or traced."""
    b = logits.shape[0]
    temperature = jnp.reshape(jnp.asarray(temperature, jnp.float32), (-1, 1))  # [b or 1, 1]
    top_p = jnp.reshape(jnp.asarray(top_p, jnp.float32), (-1, 1))
    logits = logits / temperature
    if isinstance(top_k, int):
        if top_k > 0:
            kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]  # [b, 1]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
    else:  # per-row k: the k-th largest logit of each row from one descending sort
        k = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (b,))
        desc = -jnp.sort(-logits, axis=-1)  # [b, vocab]
        kth = jnp.take_along_axis(desc, jnp.clip(k - 1, 0, logits.shape[-1] - 1)[:, None], axis=-1)  # [b, 1]
        logits = jnp.where((k[:, None] > 0) & (logits < kth), -jnp.inf, logits)
    # top-p: drop the tokens whose ascending cumulative probability stays <= 1 - top_p (always keeps the
    # most likely token), as TopPLogitsWarper does. With top_p == 1 nothing is removed.
    order = jnp.argsort(logits, axis=-1)  # ascending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = (cum <= 1.0 - top_p).at[..., -1].set(False)
    remove = jnp.zeros_like(remove_sorted).at[jnp.arange(b)[:, None], order].set(remove_sorted)
    return jnp.where(remove, -jnp.inf, logits)


def select_tokens(logits: jax.Array, key, *, do_sample: bool, temperature, top_k, top_p) -> jax.Array:
    """Next tokens [b] from last-position logits [b, vocab]: argmax, or a draw from the filtered softmax."""
    logits = logits.astype(jnp.float32)
    if not do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p), axis=-1).astype(jnp.int32)


def token_probs(logits, do_sample, temperature, top_k, top_p):
    """Filtered sampling distribution [b, vocab] float32 (one-hot argmax when greedy)."""
    logits = logits.astype(jnp.float32)
    if not do_sample:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(filter_logits(logits, temperature, top_k, top_p), axis=-1)
