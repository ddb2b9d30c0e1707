"""Batch generation: prefill + decode loop in one jitted program over a static, preallocated cache.

`generate(model, input_ids, ...)` works like transformers' `generate` (greedy or sampling, EOS, pad,
left-padded batches) and returns the prompt followed by the new tokens. Under the hood:

* the prompt is left-padded to a length bucket and the cache is allocated for
  bucket(prompt + max_new_tokens) slots, so calls whose shapes fall in the same buckets reuse one
  compiled program (max_new_tokens, temperature, top_p, seed, EOS and pad ids are traced values);
* prefill runs the whole prompt (MLA in the expanded form), then a `lax.while_loop` decodes one token
  per step (MLA in the absorbed form over the latent cache) until `max_new_tokens` or until every row
  has produced an EOS;
* positions come from the attention mask exactly as transformers computes `position_ids` for
  left-padded batches (cumsum(mask) - 1), so padded rows generate what they would alone;
* tokens can stream to the host as they are produced (`streamer=`), through an ordered
  `io_callback` from inside the loop: one compiled program, no per-step dispatch from Python.

`prefill` and `decode_step` expose the two halves (cache donated to `decode_step`) for callers who
drive their own loop, and for the tests.
"""

from __future__ import annotations

import functools
import numbers
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from jaxmodels.cache import init_cache
from jaxmodels.config import BaseConfig
from jaxmodels.inputs import decode_inputs, prefill_inputs, prompt_positions  # noqa: F401  (prompt_positions: API)
from jaxmodels.options import GENERATE_COMPILER_OPTIONS as COMPILER_OPTIONS  # noqa: F401  (the default's name)

# Incremented each time the generation program is traced (i.e. compiled): tests use it to prove that a
# second call in the same shape buckets does not recompile.
TRACE_COUNT = {"generate": 0, "prefill": 0, "decode_step": 0}

MIN_BUCKET = 16


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """The length bucket of n: the next power of two, at least `minimum`."""
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()


class GenerationError(ValueError):
    """A bad argument to generate (the message says which and how to fix it)."""


# ----------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------

def filter_logits(logits: jax.Array, temperature, top_k: int, top_p) -> jax.Array:
    """transformers' order: temperature, then top-k, then top-p. logits [b, vocab] float32; removed
    tokens get -inf. top_k is static (0 = off); temperature and top_p may be traced."""
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]  # [b, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    # top-p: drop the tokens whose ascending cumulative probability stays <= 1 - top_p (always keeps the
    # most likely token), as TopPLogitsWarper does. With top_p == 1 nothing is removed.
    order = jnp.argsort(logits, axis=-1)  # ascending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = (cum <= 1.0 - top_p).at[..., -1].set(False)
    remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
    return jnp.where(remove, -jnp.inf, logits)


def select_tokens(logits: jax.Array, key, *, do_sample: bool, temperature, top_k: int, top_p) -> jax.Array:
    """Next tokens [b] from last-position logits [b, vocab]: argmax, or a draw from the filtered softmax."""
    logits = logits.astype(jnp.float32)
    if not do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p), axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------
# Prefill and one decode step (pure functions of the model state)
# ----------------------------------------------------------------------------------------------------

def _stack_sizes(model) -> dict[str, int]:
    return {name: stack.num_layers for name, stack in model.model.stacks().items()}


def _last_logits(model, h):
    return model.logits(h[:, -1:, :])[:, 0].astype(jnp.float32)  # [b, vocab]


def _prefill(model, ids, mask, cache_len: int):
    """ids, mask [b, p] (left-padded) -> (last logits [b, vocab], cache, kv_valid [b, T], next positions [b]).
    The cache's next write slot is p."""
    b, p = ids.shape
    dtype = model.model.embed_tokens.weight.dtype
    cache = init_cache(model.config, _stack_sizes(model), b, cache_len, dtype)
    h, cache = model.model(ids, prefill_inputs(mask, model.options), cache)
    kv_valid = jnp.concatenate([mask != 0, jnp.ones((b, cache_len - p), bool)], axis=1)  # [b, T]
    next_pos = jnp.sum(mask != 0, axis=-1).astype(jnp.int32)  # position of the first new token
    return _last_logits(model, h), cache, kv_valid, next_pos


def _decode(model, cache, tokens, positions, kv_valid, index, read_len: int | None = None):
    """One token per row: tokens, positions [b], written to cache slot index -> (logits [b, vocab], cache).
    read_len (static): attend to the first read_len cache slots only (they must hold every filled one)."""
    inputs = decode_inputs(positions[:, None], kv_valid, index, model.options, read_len)
    h, cache = model.model(tokens[:, None], inputs, cache)
    return _last_logits(model, h), cache


def _pair_forward(model, cache, two, pos2, kv_valid, j, read_len: int):
    """The main model over two tokens per row, two [b, 2] at positions pos2 [b, 2], written to cache slots j and
    j + 1 (j: scalar or [b]), attending to the first read_len slots up to its own. The step both a speculative
    verify and a paired decode run. Returns (h [b, 2, hidden], logits [b, 2, vocab] float32, inputs, cache)."""
    inputs = decode_inputs(pos2, kv_valid, j, model.options, read_len)
    h, cache = model.model(two, inputs, cache)
    return h, model.logits(h).astype(jnp.float32), inputs, cache


def _decode_paired(model, cache, tokens, positions, kv_valid, index, read_len: int):
    """`_decode` computed as the first of two copies of each token (slot index + 1 gets a throwaway entry that
    the next step overwrites). Greedy decoding of a model with MTP layers runs this: it has exactly the shapes
    of a speculative verify step, so both run the same GPU kernels with the same rounding and
    speculative=True gives bit for bit the tokens of speculative=False (a 1-token step runs matrix-vector
    kernels whose bf16 rounding differs from the verify's 2-row ones and flips near-tied argmaxes)."""
    pos2 = positions[:, None] + jnp.arange(2, dtype=jnp.int32)[None]
    _, logits, _, cache = _pair_forward(model, cache, jnp.stack([tokens, tokens], axis=1), pos2, kv_valid, index,
                                        read_len)
    return logits[:, 0], cache


# Decode reads the cache in phases of growing length: a step whose filled slots fit in the first L reads only
# those L (the loop moves to the next phase when they fill up). At most READ_PHASES lengths per generate
# call (each compiles the decode step once more), halving down from the cache length; caches of at most
# MIN_PHASED_CACHE slots are read whole (too short for a phase to pay for its compile).
READ_PHASES = 4
MIN_PHASED_CACHE = 512


def read_lengths(first_index: int, cache_len: int) -> list[int]:
    """The decode loop's read lengths (static, ascending, the last = cache_len). first_index: the slot the
    first decode step writes; each step writes one slot and reads every slot up to it."""
    if cache_len <= MIN_PHASED_CACHE:
        return [cache_len]
    lengths = sorted({cache_len >> k for k in range(READ_PHASES)})
    return [n for n in lengths if n > first_index]


# The generation programs compile with the model's Options.compiler_options (default
# jaxmodels.options.GENERATE_COMPILER_OPTIONS, which explains them); one jitted function per set of options.


def _prefill_impl(graphdef, state, ids, mask, cache_len):
    TRACE_COUNT["prefill"] += 1
    return _prefill(nnx.merge(graphdef, state), ids, mask, cache_len)


def _decode_impl(graphdef, state, cache, tokens, positions, kv_valid, index):
    TRACE_COUNT["decode_step"] += 1
    return _decode(nnx.merge(graphdef, state), cache, tokens, positions, kv_valid, index)


def prefill(model, input_ids, attention_mask=None, cache_len: int | None = None):
    """Runs the prompt and fills a fresh static cache.

    input_ids, attention_mask [b, p] (left padding only). cache_len: slots to allocate (default p).
    Returns (logits [b, vocab] float32 at the last position, cache {stack: cache}, kv_valid [b, cache_len]
    bool, positions [b] of the next token). The next token goes to cache slot p (`decode_step`'s index).
    """
    ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    cache_len = ids.shape[1] if cache_len is None else int(cache_len)
    if cache_len < ids.shape[1]:
        raise GenerationError(f"cache_len={cache_len} is shorter than the prompt ({ids.shape[1]} tokens)")
    graphdef, state = nnx.split(model)
    return _jitted("prefill", model.options)(graphdef, state, ids, mask, cache_len)


def decode_step(model, cache, tokens, positions, kv_valid, index):
    """Feeds one token per row. tokens, positions [b] int; kv_valid [b, T] from `prefill`; index: the cache
    slot the tokens are written to (after a prompt of p slots: p, then p + 1, ...).

    The cache is donated (updated in place): use only the returned one. Returns (logits [b, vocab], cache).
    """
    graphdef, state = nnx.split(model)
    return _jitted("decode_step", model.options)(graphdef, state, cache, jnp.asarray(tokens, jnp.int32),
                                                 jnp.asarray(positions, jnp.int32), kv_valid,
                                                 jnp.asarray(index, jnp.int32))


# ----------------------------------------------------------------------------------------------------
# The whole loop
# ----------------------------------------------------------------------------------------------------

_STREAMERS: list[Callable[[int, np.ndarray], None]] = []


def _stream_to_host(step, tokens):
    if _STREAMERS:
        _STREAMERS[-1](int(step), np.asarray(tokens))


class _ColumnAssembler:
    """Speculative decoding produces 1 or 2 tokens per row per step, rows at different counts; this
    host-side buffer hands the user's streamer whole columns (step, tokens [batch]) in order, as plain
    decoding does: a column is complete once every row has produced it or has stopped (then: padding)."""

    def __init__(self, streamer, batch: int, pad: int):
        self.streamer, self.pad = streamer, pad
        self.cols: dict[int, np.ndarray] = {}
        self.count = np.zeros(batch, np.int64)  # tokens produced per row
        self.next = 0

    def __call__(self, n_before, toks, writes):
        n_before, toks, writes = np.asarray(n_before), np.asarray(toks), np.asarray(writes)
        active = writes[:, 0]
        for r in range(len(n_before)):
            for i in range(2):
                if writes[r, i]:
                    col = self.cols.setdefault(int(n_before[r]) + i, np.full(len(n_before), self.pad, np.int32))
                    col[r] = toks[r, i]
            self.count[r] = n_before[r] + writes[r].sum() if active[r] else self.count[r]
        self.stopped = getattr(self, "stopped", np.zeros(len(n_before), bool))
        # A row that wrote nothing this step (or hit EOS/max_new: it writes nothing afterwards) is finished
        # for the columns beyond its count; the loop only runs while some row is active.
        self.stopped |= ~active
        self._flush(lambda c: np.all((self.count > c) | self.stopped))

    def finish(self, length: int):
        self.stopped = np.ones_like(self.count, bool)
        self._flush(lambda c: c < length)

    def _flush(self, ready):
        while ready(self.next) and self.next in self.cols:
            self.streamer(self.next, self.cols.pop(self.next))
            self.next += 1


def _stream_spec_to_host(n_before, toks, writes):
    if _STREAMERS:
        _STREAMERS[-1](n_before, toks, writes)


def _emit(step, tokens, stream: bool):
    if stream:
        io_callback(_stream_to_host, None, step, tokens, ordered=True)


def _generate_impl(state, ids, mask, max_new, temperature, top_p, seed, eos, pad, *, graphdef, cache_len: int,
                  do_sample: bool, top_k: int, stream: bool):
    TRACE_COUNT["generate"] += 1
    model = nnx.merge(graphdef, state)
    b, p = ids.shape
    capacity = cache_len - p
    key = jax.random.key(seed)
    pick = functools.partial(select_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)

    def finish(step, tokens, unfinished):
        tokens = jnp.where(unfinished, tokens, pad)  # rows that already ended get padding
        unfinished = unfinished & ~jnp.any(tokens[:, None] == eos[None, :], axis=-1)
        _emit(step, tokens, stream)
        return tokens, unfinished

    with jax.named_scope("prefill"):
        logits, cache, kv_valid, pos = _prefill(model, ids, mask, cache_len)  # the next token goes to slot p
    tok, unfinished = finish(0, pick(logits, jax.random.fold_in(key, 0)), jnp.ones((b,), bool))
    out = jnp.full((b, capacity), pad, jnp.int32).at[:, 0].set(tok)

    def cond(carry):
        step, _, _, _, _, unfinished = carry
        return (step < max_new) & jnp.any(unfinished)

    def body(carry, read_len):
        step, out, tok, pos, cache, unfinished = carry
        index = p + step - 1  # step s writes slot p + s - 1
        with jax.named_scope("decode"):
            if paired:
                logits, cache = _decode_paired(model, cache, tok, pos, kv_valid, index, read_len)
            else:
                logits, cache = _decode(model, cache, tok, pos, kv_valid, index, read_len)
        tok, unfinished = finish(step, pick(logits, jax.random.fold_in(key, step)), unfinished)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, step))
        return step + 1, out, tok, pos + 1, cache, unfinished

    carry = (jnp.asarray(1, jnp.int32), out, tok, pos, cache, unfinished)
    # Greedy decoding of a model with MTP layers runs speculative decoding's step shapes and reads the whole
    # cache as it does (a different read length can round the attention sums differently): see _decode_paired.
    paired = not do_sample and _has_mtp(model)
    # step s writes slot p + s - 1 (paired: and p + s) and reads slots [0, p + s - 1]
    for n in [cache_len] if paired else read_lengths(p, cache_len):
        carry = jax.lax.while_loop(lambda c, n=n: cond(c) & (p + c[0] - 1 < n), functools.partial(body, read_len=n),
                                   carry)
    steps, out, *_ = carry
    return out, steps


# ----------------------------------------------------------------------------------------------------
# Self-speculative decoding with DeepSeek-V3's MTP layer (speculative=True)
# ----------------------------------------------------------------------------------------------------
#
# Each loop step feeds the main model two tokens per row, [tok, draft] (tok: the last committed token,
# draft: the MTP layer's guess of the token after it), in one absorbed-MLA forward over the static cache.
# Its logits at tok decide the next token; the draft is accepted when it is that token (greedy) or by
# Leviathan et al.'s rejection rule (sampling), and then the logits at the draft give one more token for
# free. The MTP layer then runs on the same two slots (main hidden state at i, embedding of token i+1)
# and drafts again from the last accepted position.
#
# Cache layout: the same as plain decoding's, one slot per token. Each row has its own write slot j (the
# slot of tok); a step writes tok and draft to slots j, j + 1 and advances j by 1 + accepted, so a rejected
# draft's entry is simply overwritten by the next step. With the same layout, the same step shapes
# (greedy plain decoding of a model with MTP layers runs `_decode_paired`) and the whole cache read by both,
# speculative greedy output is bit for bit the plain one on any backend. The MTP layer has its own
# one-layer latent cache with the same slots.

def _has_mtp(model) -> bool:
    from jaxmodels.layers.mtp import num_mtp_layers

    return num_mtp_layers(model) > 0


def _stack_sizes_mtp(model) -> dict[str, int]:
    return {"mtp_layers": model.model.mtp_layers.num_layers}


def _probs(logits, do_sample, temperature, top_k, top_p):
    """Filtered sampling distribution [b, vocab] float32 (one-hot argmax when greedy)."""
    logits = logits.astype(jnp.float32)
    if not do_sample:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(filter_logits(logits, temperature, top_k, top_p), axis=-1)


def _speculative_impl(state, ids, mask, max_new, temperature, top_p, seed, eos, pad, *, graphdef, cache_len: int,
                      do_sample: bool, top_k: int, stream: bool):
    TRACE_COUNT["generate"] += 1
    model = nnx.merge(graphdef, state)
    b, p = ids.shape
    capacity = cache_len - p  # output columns (>= max_new_tokens, see generate)
    key = jax.random.key(seed)
    pick = functools.partial(select_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    probs = functools.partial(_probs, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    is_eos = lambda t: jnp.any(t[:, None] == eos[None, :], axis=-1)  # noqa: E731
    dtype = model.model.embed_tokens.weight.dtype
    rows = jnp.arange(b)

    with jax.named_scope("prefill"):
        cache = init_cache(model.config, _stack_sizes(model), b, cache_len, dtype)
        mtp_cache = init_cache(model.config, _stack_sizes_mtp(model), b, cache_len, dtype)
        inputs = prefill_inputs(mask, model.options)
        h, cache = model.model(ids, inputs, cache)
        tok = pick(_last_logits(model, h), jax.random.fold_in(key, 0))
        # MTP over the prompt: index i combines h_i with token i+1 (the last one: the token just chosen).
        shifted = jnp.concatenate([ids[:, 1:], tok[:, None]], axis=1)
        hm, mtp_cache, _ = model.model.mtp(h, shifted, inputs, mtp_cache)
        dl = model.logits(hm[:, -1:])[:, 0].astype(jnp.float32)  # [b, vocab]
        q = probs(dl) if do_sample else jnp.zeros((b, 1), jnp.float32)
        draft = pick(dl, jax.random.fold_in(key, 1 << 20))
    kv_valid = jnp.concatenate([mask != 0, jnp.ones((b, cache_len - p), bool)], axis=1)  # [b, T]
    pos = jnp.sum(mask != 0, axis=-1).astype(jnp.int32)  # position of tok
    out = jnp.full((b, capacity), pad, jnp.int32).at[:, 0].set(tok)
    unfinished = ~is_eos(tok) & (max_new > 1)
    if stream:
        io_callback(_stream_spec_to_host, None, jnp.zeros((b,), jnp.int32), jnp.stack([tok, tok], 1),
                    jnp.stack([jnp.ones((b,), bool), jnp.zeros((b,), bool)], 1), ordered=True)
    n_out = jnp.ones((b,), jnp.int32)
    zero = jnp.zeros((), jnp.int32)

    def cond(carry):
        return jnp.any(carry["unfinished"])

    def body(c):
        j, active = c["j"], c["unfinished"]  # j [b]: each row's slot of tok
        step_key = jax.random.fold_in(key, c["step"])
        k_accept, k_resid, k_next, k_draft = jax.random.split(step_key, 4)
        two = jnp.stack([c["tok"], c["draft"]], axis=1)  # [b, 2]
        pos2 = c["pos"][:, None] + jnp.arange(2, dtype=jnp.int32)[None]  # [b, 2]
        with jax.named_scope("verify"):
            h, logits, inputs, cache = _pair_forward(model, c["cache"], two, pos2, kv_valid, j, cache_len)
        d = c["draft"]
        if do_sample:
            p0 = probs(logits[:, 0])
            q_d = jnp.take_along_axis(c["q"], d[:, None], axis=1)[:, 0]
            p_d = jnp.take_along_axis(p0, d[:, None], axis=1)[:, 0]
            accept = jax.random.uniform(k_accept, (b,)) * q_d < p_d
            resid = jnp.maximum(p0 - c["q"], 0.0)
            resid = jnp.where(resid.sum(-1, keepdims=True) > 0, resid, p0)
            e0 = jnp.where(accept, d, jax.random.categorical(k_resid, jnp.log(resid), axis=-1).astype(jnp.int32))
            e1 = pick(logits[:, 1], k_next)
        else:
            e0, e1 = pick(logits[:, 0], None), pick(logits[:, 1], None)
            accept = e0 == d
        # Tokens this step emits per row: e0, then e1 if the draft was accepted; EOS and max_new stop a row.
        n = c["n_out"]
        w0 = active & (n < max_new)
        f0 = w0 & is_eos(e0)
        w1 = w0 & ~f0 & accept & (n + 1 < max_new)
        f1 = w1 & is_eos(e1)
        out = c["out"].at[rows, jnp.where(w0, n, capacity)].set(e0, mode="drop")
        out = out.at[rows, jnp.where(w1, n + 1, capacity)].set(e1, mode="drop")
        n_new = n + w0.astype(jnp.int32) + w1.astype(jnp.int32)
        unfinished = active & ~f0 & ~f1 & (n_new < max_new)
        if stream:
            io_callback(_stream_spec_to_host, None, n, jnp.stack([e0, e1], 1), jnp.stack([w0, w1], 1), ordered=True)
        advance = jnp.where(active, 1 + accept.astype(jnp.int32), 0)  # finished rows stay where they are
        with jax.named_scope("draft"):
            hm, mtp_cache, _ = model.model.mtp(h, jnp.stack([e0, e1], axis=1), inputs, c["mtp_cache"])
            hd = jnp.where(accept[:, None], hm[:, 1], hm[:, 0])  # the MTP state at the last accepted position
            dl = model.logits(hd[:, None])[:, 0].astype(jnp.float32)
            q = probs(dl) if do_sample else c["q"]
            draft = pick(dl, k_draft)
        return dict(step=c["step"] + 1, j=j + advance, out=out, n_out=n_new, tok=jnp.where(accept, e1, e0),
                    draft=draft, q=q, pos=c["pos"] + advance, cache=cache, mtp_cache=mtp_cache, unfinished=unfinished,
                    verified=c["verified"] + active.sum(dtype=jnp.int32),
                    accepted=c["accepted"] + (active & accept).sum(dtype=jnp.int32))

    j = jnp.full((b,), p, jnp.int32)
    carry = dict(step=jnp.asarray(1, jnp.int32), j=j, out=out, n_out=n_out, tok=tok, draft=draft, q=q, pos=pos,
                 cache=cache, mtp_cache=mtp_cache, unfinished=unfinished, verified=zero, accepted=zero)
    # A step writes slots j, j + 1 (at most p + max_new - 1, see generate) and reads the whole cache.
    c = jax.lax.while_loop(lambda c: cond(c) & (jnp.max(c["j"]) + 2 <= cache_len), body, carry)
    return c["out"], jnp.max(c["n_out"]), jnp.stack([c["verified"], c["accepted"], c["step"] - 1])


_IMPLS = {"prefill": (_prefill_impl, dict(static_argnums=(0, 4))),
          "decode_step": (_decode_impl, dict(static_argnums=(0,), donate_argnums=(2,))),
          "generate": (_generate_impl, dict(static_argnames=("graphdef", "cache_len", "do_sample", "top_k", "stream"))),
          "speculative": (_speculative_impl, dict(static_argnames=("graphdef", "cache_len", "do_sample", "top_k",
                                                                   "stream")))}


@functools.cache
def _jit_with(kind: str, compiler_options: tuple) -> Callable:
    fn, kw = _IMPLS[kind]
    return jax.jit(fn, compiler_options=dict(compiler_options), **kw)


def _jitted(kind: str, options) -> Callable:
    """The jitted generation program `kind` compiled with the options' XLA compiler options."""
    return _jit_with(kind, tuple(sorted(options.generate_compiler_options.items())))


def _eos_list(eos_token_id, cfg: BaseConfig) -> tuple[int, ...]:
    if eos_token_id is None:
        return cfg.eos_token_ids
    if isinstance(eos_token_id, (int, np.integer)):
        return (int(eos_token_id),)
    return tuple(int(e) for e in eos_token_id)


def _check_args(model, ids, mask, max_new_tokens, do_sample, temperature, top_k, top_p):
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "logits"):
        raise GenerationError(f"generate needs a jaxmodels CausalLM, got {type(model).__name__}; load one with "
                              "jaxmodels.from_pretrained on a *ForCausalLM checkpoint")
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise GenerationError(f"input_ids must be a non-empty [batch, seq] array, got shape {tuple(ids.shape)}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise GenerationError(f"input_ids must be integers, got {ids.dtype}")
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise GenerationError(f"input_ids must lie in [0, vocab_size={cfg.vocab_size}), got values in "
                              f"[{ids.min()}, {ids.max()}]")
    if mask.shape != ids.shape:
        raise GenerationError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}")
    if (mask[:, -1] == 0).any() or (np.diff(mask.astype(np.int8), axis=1) < 0).any():
        raise GenerationError("attention_mask must be left-padded (zeros only before the tokens of each row); "
                              "use a tokenizer with padding_side='left'")
    if (mask.sum(axis=1) == 0).any():
        raise GenerationError("a row of attention_mask is all zeros: every prompt needs at least one token")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise GenerationError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
    if not isinstance(top_p, numbers.Real) or not 0.0 < top_p <= 1.0:
        raise GenerationError(f"top_p must be a float in (0, 1] (1 disables it), got {top_p!r}")
    if not isinstance(temperature, numbers.Real) or not temperature > 0 or not np.isfinite(temperature):
        raise GenerationError(f"temperature must be a finite float > 0, got {temperature!r}; use do_sample=False "
                              "for greedy decoding")
    limit = cfg.max_position_embeddings
    if ids.shape[1] > limit:
        raise GenerationError(f"the prompt has {ids.shape[1]} tokens, more than the model's "
                              f"max_position_embeddings={limit}; shorten the prompt")
    longest = int(mask.sum(axis=1).max())
    if longest + max_new_tokens > limit:
        raise GenerationError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                              f"max_position_embeddings={limit}; lower max_new_tokens to at most {limit - longest}")


def generate(model, input_ids, attention_mask=None, max_new_tokens: int = 20, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_token_id=None, pad_token_id=None,
             seed: int = 0, *, streamer: Callable[[int, np.ndarray], None] | None = None,
             cache_len: int | None = None, speculative: bool = False, return_stats: bool = False):
    """Generates continuations of a batch of prompts, like transformers' `generate`.

    model: a jaxmodels CausalLM. input_ids [batch, prompt] int; attention_mask [batch, prompt] with 0 on
    left padding (default: all ones). do_sample=False is greedy; otherwise tokens are drawn after
    `temperature`, `top_k` (0 = off) and `top_p` (1 = off), reproducibly for a given `seed`.
    eos_token_id: int or list (default: the config's); rows stop at their first EOS and are padded with
    `pad_token_id` (default: the config's, else the first EOS) until every row has stopped or
    `max_new_tokens` were produced. streamer(step, tokens [batch]) is called on the host as each step's
    tokens are produced. cache_len: cache slots (default: the bucket of the padded prompt + new tokens).

    speculative=True: self-speculative decoding with the model's DeepSeek-V3 MTP layer (see the section
    above `_speculative_impl`): each step verifies the MTP draft and the next token in one forward pass.
    Greedy output is the same as speculative=False; sampling keeps the same distribution (speculative
    sampling with rejection). Needs the model loaded with its MTP layers. (Greedy decoding of a model with
    MTP layers computes each step as speculative decoding's 2-token verify does, so that the two agree bit
    for bit on GPUs too, whose kernels round a 1-row and a 2-row matmul differently.)

    Returns int32 [batch, prompt + new] numpy ids, the prompt first; `new` <= max_new_tokens. With
    return_stats, returns (ids, stats): {"steps": forward passes of the decode loop, "new_tokens",
    and with speculative=True "drafted", "accepted", "acceptance_rate" (accepted / drafted, over rows still
    generating)}.
    """
    ids = np.asarray(input_ids)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    _check_args(model, ids, mask, max_new_tokens, do_sample, temperature, top_k, top_p)
    cfg: BaseConfig = model.config
    eos = _eos_list(eos_token_id, cfg)
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0)
    if speculative:
        from jaxmodels.layers.mtp import num_mtp_layers
        if num_mtp_layers(model) == 0:
            raise GenerationError("speculative=True needs DeepSeek-V3's multi-token-prediction (MTP) layer, which this "
                                  "model does not have: load a checkpoint that holds it (keys model.layers."
                                  "{num_hidden_layers}.*, e.g. deepseek-ai/DeepSeek-V3) without mtp=False, or use "
                                  "speculative=False")
    b, p = ids.shape
    pb = bucket(p)
    need = pb + int(max_new_tokens)
    if cache_len is None:
        cache_len = bucket(need)
    elif cache_len < need:
        raise GenerationError(f"cache_len={cache_len} is too small for the padded prompt ({pb}) + max_new_tokens "
                              f"({max_new_tokens}) = {need} slots")
    # Left-pad to the bucket: masked slots change nothing, and the compiled program is reused.
    ids_b = np.zeros((b, pb), np.int32)
    mask_b = np.zeros((b, pb), np.int32)
    ids_b[:, pb - p:] = ids
    mask_b[:, pb - p:] = mask
    # EOS ids padded with -1 (never a token) to a multiple of 8, so the list's length is not a new shape.
    eos_arr = np.full((-(-max(len(eos), 1) // 8) * 8,), -1, np.int32)
    eos_arr[:len(eos)] = eos
    graphdef, state = nnx.split(model)
    assembler = None
    if streamer is not None:
        if speculative:
            streamer = assembler = _ColumnAssembler(streamer, b, int(pad_token_id))
        _STREAMERS.append(streamer)
    fn = _jitted("speculative" if speculative else "generate", model.options)
    try:
        res = fn(state, ids_b, mask_b, np.int32(max_new_tokens), np.float32(temperature), np.float32(top_p),
                 np.int32(seed), eos_arr, np.int32(pad_token_id), graphdef=graphdef, cache_len=int(cache_len),
                 do_sample=bool(do_sample), top_k=int(top_k), stream=streamer is not None)
        if streamer is not None:
            jax.effects_barrier()
    finally:
        if streamer is not None:
            _STREAMERS.pop()
    out, steps = res[0], int(res[1])
    if assembler is not None:
        assembler.finish(steps)
    result = np.concatenate([ids.astype(np.int32), np.asarray(out)[:, :steps]], axis=1)
    if not return_stats:
        return result
    stats = {"new_tokens": steps, "steps": steps - 1}
    if speculative:
        drafted, accepted, loop_steps = (int(x) for x in np.asarray(res[2]))
        stats.update(steps=loop_steps, drafted=drafted, accepted=accepted,
                     acceptance_rate=accepted / drafted if drafted else float("nan"))
    return result, stats


__all__ = ["generate", "prefill", "decode_step", "bucket", "filter_logits", "select_tokens", "GenerationError",
           "TRACE_COUNT"]
