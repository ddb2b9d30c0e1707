"""`jaxmodels.generate`: the argument checks and the call into one compiled program (steps or speculative)."""

from __future__ import annotations

import numbers
from typing import Callable

import numpy as np
from flax import nnx

from jaxmodels.config import BaseConfig
from jaxmodels.generate.speculative import speculative_program
from jaxmodels.generate.steps import GenerationError, bucket, generate_program
from jaxmodels.generate.streaming import Channel, ColumnAssembler

# RoPE types that define positions beyond max_position_embeddings: `dynamic` grows its base (NTK) with the
# sequence, as transformers does, so generation may go there.
ROPE_TYPES_THAT_GROW = ("dynamic",)


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
    if cfg.rope.rope_type in ROPE_TYPES_THAT_GROW:
        return  # positions past max_position_embeddings are defined: the cache (cache_len) is the only limit
    limit = cfg.max_position_embeddings
    if ids.shape[1] > limit:
        raise GenerationError(f"the prompt has {ids.shape[1]} tokens, more than the model's "
                              f"max_position_embeddings={limit} (rope type {cfg.rope.rope_type!r} defines no "
                              "positions past it); shorten the prompt")
    longest = int(mask.sum(axis=1).max())
    if longest + max_new_tokens > limit:
        raise GenerationError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                              f"max_position_embeddings={limit} (rope type {cfg.rope.rope_type!r} defines no "
                              f"positions past it); lower max_new_tokens to at most {limit - longest}")


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

    speculative=True: self-speculative decoding with the model's DeepSeek-V3 MTP layer (see
    `jaxmodels.generate.speculative`): each step verifies the MTP draft and the next token in one forward pass.
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
            assembler = ColumnAssembler(streamer, b, int(pad_token_id))
            on_host = assembler
        else:
            def on_host(step, tokens):
                streamer(int(step), tokens)
    fn = speculative_program(model.options) if speculative else generate_program(model.options)
    args = (state, ids_b, mask_b, np.int32(max_new_tokens), np.float32(temperature), np.float32(top_p),
            np.int32(seed), eos_arr, np.int32(pad_token_id))
    kw = dict(graphdef=graphdef, cache_len=int(cache_len), do_sample=bool(do_sample), top_k=int(top_k),
              stream=streamer is not None)
    if streamer is None:
        res = fn(*args, **kw)
    else:
        with Channel(on_host) as channel:
            res = fn(*args, np.int32(channel.id), **kw)
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

