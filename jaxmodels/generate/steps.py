"""The prefill and decode programs over a static, preallocated cache, and `generate`'s whole loop.

* `prefill` runs left-padded prompts (MLA in the expanded form) into a fresh cache; `decode_step` feeds one
  token per row (MLA in the absorbed form over the latent cache). Callers who drive their own loop use these
  two (the cache is donated to `decode_step`), and the tests.
* `generate_program()` is `generate`'s one compiled program: prefill, then a `lax.while_loop` that decodes
  one token per step until `max_new_tokens` or until every row has produced an EOS, reading the cache in
  phases of growing length (`read_lengths`).
* positions come from the attention mask exactly as transformers computes `position_ids` for left-padded
  batches (cumsum(mask) - 1), so padded rows generate what they would alone.
* every program is jitted once per (function, compiler options) by `program`; the compiler options are the
  model's (`Options.compiler_options`), so a model with other options gets its own programs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.cache import init_cache
from jaxmodels.generate.sampling import select_tokens
from jaxmodels.generate.streaming import emit
from jaxmodels.inputs import decode_inputs, prefill_inputs, prompt_positions  # noqa: F401  (prompt_positions: API)
from jaxmodels.options import GENERATE_COMPILER_OPTIONS as COMPILER_OPTIONS  # noqa: F401  (the default's name)
from jaxmodels.options import Options

MIN_BUCKET = 16


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """The length bucket of n: the next power of two, at least `minimum`."""
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()


class GenerationError(ValueError):
    """A bad argument to generate (the message says which and how to fix it)."""


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


_programs: dict = {}


def program(fn, options: Options = Options(), **jit_kwargs):
    """fn under `jax.jit(fn, compiler_options=options.generate_compiler_options, **jit_kwargs)`, built once per
    (fn, compiler options, jit arguments): each caller of the same program shares its compile cache (`.lower`,
    `._cache_size()` for tests and benchmarks). options: the model's Options (their compiler_options; default
    jaxmodels.options.GENERATE_COMPILER_OPTIONS, which says why)."""
    compiler_options = tuple(sorted(options.generate_compiler_options.items()))
    key = (fn, compiler_options, tuple(sorted(jit_kwargs.items())))
    if key not in _programs:
        _programs[key] = jax.jit(fn, compiler_options=dict(compiler_options), **jit_kwargs)
    return _programs[key]


def _prefill_impl(graphdef, state, ids, mask, cache_len):
    return _prefill(nnx.merge(graphdef, state), ids, mask, cache_len)


def _decode_impl(graphdef, state, cache, tokens, positions, kv_valid, index):
    return _decode(nnx.merge(graphdef, state), cache, tokens, positions, kv_valid, index)


def prefill_program(options: Options = Options()):
    """The jitted `(graphdef, state, ids, mask, cache_len) -> prefill outputs` (graphdef, cache_len static), with
    the compiler options of `options` (the model's)."""
    return program(_prefill_impl, options, static_argnums=(0, 4))


def decode_program(options: Options = Options()):
    """The jitted `(graphdef, state, cache, tokens, positions, kv_valid, index) -> (logits, cache)`, cache
    donated."""
    return program(_decode_impl, options, static_argnums=(0,), donate_argnums=(2,))


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
    return prefill_program(model.options)(graphdef, state, ids, mask, cache_len)


def decode_step(model, cache, tokens, positions, kv_valid, index):
    """Feeds one token per row. tokens, positions [b] int; kv_valid [b, T] from `prefill`; index: the cache
    slot the tokens are written to (after a prompt of p slots: p, then p + 1, ...).

    The cache is donated (updated in place): use only the returned one. Returns (logits [b, vocab], cache).
    """
    graphdef, state = nnx.split(model)
    return decode_program(model.options)(graphdef, state, cache, jnp.asarray(tokens, jnp.int32),
                                         jnp.asarray(positions, jnp.int32), kv_valid, jnp.asarray(index, jnp.int32))


# ----------------------------------------------------------------------------------------------------
# generate's program: prefill, then the decode loop
# ----------------------------------------------------------------------------------------------------

def _has_mtp(model) -> bool:
    from jaxmodels.layers.mtp import num_mtp_layers

    return num_mtp_layers(model) > 0


def _generate_impl(state, ids, mask, max_new, temperature, top_p, seed, eos, pad, channel=None, *, graphdef,
                   cache_len: int, do_sample: bool, top_k: int, stream: bool):
    model = nnx.merge(graphdef, state)
    b, p = ids.shape
    capacity = cache_len - p
    key = jax.random.key(seed)
    pick = functools.partial(select_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)

    def finish(step, tokens, unfinished):
        tokens = jnp.where(unfinished, tokens, pad)  # rows that already ended get padding
        unfinished = unfinished & ~jnp.any(tokens[:, None] == eos[None, :], axis=-1)
        if stream:
            emit(channel, step, tokens)
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


def generate_program(options: Options = Options()):
    """`generate`'s jitted program: (state, ids, mask, max_new, temperature, top_p, seed, eos, pad[, channel]) ->
    (new tokens [b, cache_len - p], steps); graphdef, cache_len, do_sample, top_k and stream are static
    keywords. channel: the `streaming.Channel` id when stream=True. options: the model's (compiler options)."""
    return program(_generate_impl, options,
                   static_argnames=("graphdef", "cache_len", "do_sample", "top_k", "stream"))
