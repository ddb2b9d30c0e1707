"""Self-speculative decoding with DeepSeek-V3's MTP layer (`generate(..., speculative=True)`).

Each loop step feeds the main model two tokens per row, [tok, draft] (tok: the last committed token,
draft: the MTP layer's guess of the token after it), in one absorbed-MLA forward over the static cache.
Its logits at tok decide the next token; the draft is accepted when it is that token (greedy) or by
Leviathan et al.'s rejection rule (sampling), and then the logits at the draft give one more token for
free. The MTP layer then runs on the same two slots (main hidden state at i, embedding of token i+1)
and drafts again from the last accepted position.

Cache layout: the same as plain decoding's, one slot per token. Each row has its own write slot j (the
slot of tok); a step writes tok and draft to slots j, j + 1 and advances j by 1 + accepted, so a rejected
draft's entry is simply overwritten by the next step. With the same layout, the same step shapes
(greedy plain decoding of a model with MTP layers runs `steps._decode_paired`) and the whole cache read by
both, speculative greedy output is bit for bit the plain one on any backend. The MTP layer has its own
one-layer latent cache with the same slots.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.cache import init_cache
from jaxmodels.generate.sampling import select_tokens, token_probs
from jaxmodels.generate.steps import _last_logits, _pair_forward, _stack_sizes, program
from jaxmodels.generate.streaming import emit
from jaxmodels.inputs import prefill_inputs
from jaxmodels.options import Options


def _stack_sizes_mtp(model) -> dict[str, int]:
    return {"mtp_layers": model.model.mtp_layers.num_layers}


def _speculative_impl(state, ids, mask, max_new, temperature, top_p, seed, eos, pad, channel=None, *, graphdef,
                      cache_len: int, do_sample: bool, top_k: int, stream: bool):
    model = nnx.merge(graphdef, state)
    b, p = ids.shape
    capacity = cache_len - p  # output columns (>= max_new_tokens, see generate)
    key = jax.random.key(seed)
    pick = functools.partial(select_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    probs = functools.partial(token_probs, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
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
        emit(channel, jnp.zeros((b,), jnp.int32), jnp.stack([tok, tok], 1),
             jnp.stack([jnp.ones((b,), bool), jnp.zeros((b,), bool)], 1))
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
            emit(channel, n, jnp.stack([e0, e1], 1), jnp.stack([w0, w1], 1))
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


def speculative_program(options: Options = Options()):
    """The jitted speculative loop; the same arguments as `steps.generate_program()`'s, and it returns (new
    tokens, new token count, [drafted, accepted, loop steps]). With stream=True, `emit`s (n_before [b],
    tokens [b, 2], written [b, 2]) per step for a `streaming.ColumnAssembler`. options: the model's."""
    return program(_speculative_impl, options,
                   static_argnames=("graphdef", "cache_len", "do_sample", "top_k", "stream"))
