"""`jaxmodels generate`: text in, text out.

  jaxmodels generate --prompt "def fib(n):"                  # the embedded default model, no download
  jaxmodels generate --model PATH_OR_HUB_ID --prompt "..." [--prompt-file prompts.txt] [--chat]
                     [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--dtype bf16]

Without --model the embedded default model (`jaxmodels.default_model_dir()`: a small DeepSeek-V3 trained
on Python's standard library) runs; `--model tiny-random` builds a tiny random one (for tests).
Sampling is on when --temperature > 0 (default 0: greedy). All prompts (every --prompt, then each
non-empty line of --prompt-file) run as one left-padded batch. A single prompt is echoed, then its
continuation (as transformers' text-generation pipeline returns it; --no-echo prints the continuation
only); in a batch each continuation follows a `=== [i] prompt` header. With a single prompt the continuation streams to the terminal as tokens are produced (an ordered
io_callback from inside the jitted decode loop hands each step's tokens to the host), decoded
incrementally so a character split over several byte-level tokens is printed only once complete; with
several, each completion is printed when done.
"""

from __future__ import annotations

import argparse
import os
import sys

from jaxmodels.tokenizer import continuation  # noqa: F401  (re-exported: tests and scripts use it here)
from jaxmodels.units import DTYPES

TINY_RANDOM = "tiny-random"
DEFAULT_PROMPT = "def fib(n):"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint directory or hub id; default: the embedded model (jaxmodels.default_model_dir(), "
                        f"no download); '{TINY_RANDOM}': a tiny random DeepSeek-V3 built in memory (tests)")
    p.add_argument("--prompt", action="append", default=[],
                   help=f"prompt text (repeatable; default, with no --prompt-file either: {DEFAULT_PROMPT!r})")
    p.add_argument("--prompt-file", help="a file with one prompt per line; all prompts run as one batch")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples (default: 0)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default: 0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="parameter dtype (default: the checkpoint's)")
    p.add_argument("--no-stream", action="store_true", help="print completions only when done")
    p.add_argument("--no-echo", action="store_true", help="print only the continuation, not the prompt before it")
    p.add_argument("--speculative", action="store_true",
                   help="self-speculative decoding with the checkpoint's DeepSeek-V3 MTP layer (same greedy output, "
                        "fewer forward passes); prints the draft acceptance rate")


def tiny_random_model(seed: int = 0):
    """A small DeepSeek-V3 (MLA + noaux_tc MoE) with random weights and the built-in byte tokenizer."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxmodels.config import DeepseekV3Config
    from jaxmodels.model import CausalLM
    from jaxmodels.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    cfg = DeepseekV3Config(
        vocab_size=tok.tok.get_vocab_size(), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, kv_lora_rank=32,
        q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=2048,
        bos_token_id=tok.token_id(tok.bos_token), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return CausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(seed), std=0.1), tok


def load(model: str, dtype: str | None):
    """(model, tokenizer) for a checkpoint path / hub id (None: the embedded default model), or the
    in-memory tiny-random model."""
    if model == TINY_RANDOM:
        return tiny_random_model()
    if model is None:
        from jaxmodels import default_model_dir
        model = default_model_dir()
    from jaxmodels.convert.hf import from_pretrained, resolve_checkpoint
    from jaxmodels.tokenizer import Tokenizer

    path = resolve_checkpoint(model)
    tok = Tokenizer.from_checkpoint(path)  # before the weights: a missing tokenizer fails fast
    m = from_pretrained(path, None if dtype is None else DTYPES[dtype], progress=False)
    if not hasattr(m, "logits"):
        from jaxmodels.generate import GenerationError
        raise GenerationError(f"{model} is a {type(m).__name__} checkpoint; generate needs a *ForCausalLM one")
    return m, tok


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        prompts = [DEFAULT_PROMPT]
    return prompts


def check_args(args) -> None:
    """The flags alone, checked before any model is loaded (what needs the model, e.g. the prompt against
    max_position_embeddings, is checked by jaxmodels.generate)."""
    import math

    from jaxmodels.generate import GenerationError

    if args.max_new_tokens < 1:
        raise GenerationError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise GenerationError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if args.top_k < 0:
        raise GenerationError(f"--top-k must be >= 0 (0: all tokens), got {args.top_k}")
    if not 0.0 < args.top_p <= 1.0:
        raise GenerationError(f"--top-p must be in (0, 1] (1: off), got {args.top_p}")
    if args.prompt_file and not os.path.isfile(args.prompt_file):
        raise GenerationError(f"--prompt-file {args.prompt_file!r} does not exist; pass a text file with one prompt "
                              "per line")


class _Printer:
    """Streams one row's continuation: decodes the prompt and the tokens so far and prints what is new. A
    byte-level token can end inside a multi-byte character (decoded as U+FFFD): that text waits for the
    token that completes it, so only whole characters are printed."""

    def __init__(self, tok, eos: set[int], pad: int, out, prompt_ids: list[int] = ()):
        self.tok, self.eos, self.pad, self.out = tok, eos, pad, out
        self.ids: list[int] = list(prompt_ids)
        self.shown = tok.decode(self.ids) if self.ids else ""
        self.done = False

    def __call__(self, step: int, tokens) -> None:
        if self.done:
            return
        t = int(tokens[0])
        if t in self.eos:
            self.done = True
            return
        self.ids.append(t)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return
        self.out.write(text[len(self.shown):])
        self.out.flush()
        self.shown = text


FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"


def _fast_compile_for_the_embedded_model(args) -> None:
    """The embedded model is tiny: compiling its programs with LLVM's full optimisation takes most of the
    first command's time (measured on 2 CPU cores: 19 s -> 11 s end to end, same tokens), and the compiled
    code's speed does not matter at this size. XLA reads XLA_FLAGS when the backend starts, so this only
    acts in a fresh process (the CLI), and never when the user set the flag or chose a --model."""
    flags = os.environ.get("XLA_FLAGS", "")
    if args.model is None and "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {FAST_COMPILE_FLAG}".strip()


def run(args) -> int:
    _fast_compile_for_the_embedded_model(args)
    from jaxmodels.config import ConfigError
    from jaxmodels.convert.hf import CheckpointError
    from jaxmodels.generate import GenerationError, generate
    from jaxmodels.tokenizer import TokenizerError

    out = sys.stdout
    echoed = False  # an error after the prompt was echoed starts on a line of its own
    try:
        check_args(args)
        prompts = read_prompts(args)
        model, tok = load(args.model, args.dtype)
        if args.chat:
            encoded = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
        else:
            encoded = [tok.encode(p) for p in prompts]
        cfg = model.config
        eos = list(cfg.eos_token_ids) or ([tok.eos_token_id] if tok.eos_token_id is not None else [])
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else (tok.pad_token_id if tok.pad_token_id is not None
                                                                     else (eos[0] if eos else 0))
        ids, mask = tok.batch(encoded, pad)
        stream = len(prompts) == 1 and not args.no_stream
        printer = _Printer(tok, set(eos), pad, out, encoded[0]) if stream else None
        if stream and not args.no_echo:
            out.write(prompts[0])
            out.flush()
            echoed = True
        result = generate(model, ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                          do_sample=args.temperature > 0, temperature=args.temperature if args.temperature > 0 else 1.0,
                          top_k=args.top_k, top_p=args.top_p, eos_token_id=eos, pad_token_id=pad, seed=args.seed,
                          streamer=printer, speculative=args.speculative, return_stats=args.speculative)
        if args.speculative:
            result, stats = result
    except (FileNotFoundError, ConfigError, CheckpointError, GenerationError, TokenizerError) as e:
        if echoed:
            out.write("\n")
            out.flush()
        hint = " (or omit --model to run the embedded default model)" if (
            isinstance(e, FileNotFoundError) and args.model is not None) else ""
        print(f"jaxmodels generate: error: {e}{hint}", file=sys.stderr)
        return 2
    new = result[:, ids.shape[1]:]
    if stream:
        out.write("\n")
    else:
        for i, p in enumerate(prompts):
            row = [int(t) for t in new[i] if int(t) not in eos and int(t) != pad]
            if len(prompts) > 1:  # the header names the prompt: the continuation follows on its own
                out.write(f"=== [{i}] {p}\n")
            echo = "" if args.no_echo or len(prompts) > 1 else p
            out.write(echo + continuation(tok, encoded[i], row) + "\n")
    if args.speculative:
        print(f"speculative: {stats['new_tokens']} tokens in {stats['steps'] + 1} forward passes, draft acceptance "
              f"{stats['acceptance_rate']:.1%} ({stats['accepted']}/{stats['drafted']})", file=sys.stderr)
    out.flush()
    return 0
