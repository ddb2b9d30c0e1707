"""Text in, text out: a checkpoint's tokenizer.json (via `tokenizers`) and its chat template (via jinja2).

`Tokenizer.from_checkpoint(dir)` reads tokenizer.json plus tokenizer_config.json (special tokens, chat
template; transformers 5 may keep the template in chat_template.jinja). `apply_chat_template` renders
the template the way transformers does (sandboxed jinja2, trim_blocks/lstrip_blocks, `raise_exception`,
`strftime_now`, `tojson`) and tokenizes the result without adding special tokens again.
`byte_tokenizer()` is the built-in byte-level tokenizer of the embedded `tiny-random` model.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Sequence

import numpy as np


class TokenizerError(ValueError):
    """The checkpoint has no usable tokenizer / chat template (the message says what is missing)."""


def _token_str(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} (AddedToken serialisation)
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, tokenizer, config: dict[str, Any] | None = None, chat_template: str | None = None):
        self.tok = tokenizer
        self.config = dict(config or {})
        self.chat_template = chat_template
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.pad_token = _token_str(self.config.get("pad_token"))

    @classmethod
    def from_checkpoint(cls, path: str) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        file = os.path.join(path, "tokenizer.json")
        if not os.path.exists(file):
            raise TokenizerError(f"no tokenizer.json in {path}: jaxmodels reads fast-tokenizer files; save one with "
                                 "transformers' AutoTokenizer.from_pretrained(...).save_pretrained(dir), or pass "
                                 "token ids to jaxmodels.generate directly")
        try:
            tok = HFTokenizer.from_file(file)
        except Exception as e:  # tokenizers raises its own Exception type
            raise TokenizerError(f"{file} could not be read ({e}); re-download it") from e
        config, template = {}, None
        cfg_file = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(cfg_file):
            with open(cfg_file) as f:
                config = json.load(f)
            template = config.get("chat_template")
            if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
                named = {t.get("name"): t.get("template") for t in template}
                template = named.get("default") or next(iter(named.values()), None)
        jinja = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.exists(jinja):
            with open(jinja) as f:
                template = f.read()
        return cls(tok, config, template)

    # ----- ids -----
    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self.token_id(self.pad_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch(self, ids: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Left-pads token lists into (input_ids, attention_mask) [batch, longest]."""
        longest = max(len(x) for x in ids)
        out = np.full((len(ids), longest), pad_id, np.int32)
        mask = np.zeros((len(ids), longest), np.int32)
        for i, x in enumerate(ids):
            if len(x) == 0:
                raise TokenizerError(f"prompt {i} encodes to no tokens; give a non-empty prompt")
            out[i, longest - len(x):] = x
            mask[i, longest - len(x):] = 1
        return out, mask

    # ----- chat -----
    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise TokenizerError("--chat needs a chat template, and this checkpoint's tokenizer_config.json (or "
                                 "chat_template.jinja) has none; drop --chat to use the raw prompt")
        return render_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                               bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                               pad_token=self.pad_token or "")

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        # The template writes the special tokens itself (transformers encodes with add_special_tokens=False).
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)


def continuation(tok, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
    """The text `new_ids` adds after the prompt: decode(prompt + new) minus decode(prompt), as transformers'
    pipelines cut it (a word-level tokenizer's joining space or a character split across the boundary comes
    out right, which decode(new) alone would get wrong)."""
    head, full = tok.decode(list(prompt_ids)), tok.decode(list(prompt_ids) + list(new_ids))
    return full[len(head):] if full.startswith(head) else tok.decode(list(new_ids))


def render_template(template: str, messages, **kwargs) -> str:
    """Renders a chat template as transformers' `apply_chat_template` does."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template).render(messages=messages, **kwargs)
    except TemplateError as e:
        raise TokenizerError(f"the chat template failed to render: {e}") from e


# ----------------------------------------------------------------------------------------------------
# The built-in byte-level tokenizer (for the embedded tiny-random model)
# ----------------------------------------------------------------------------------------------------

BYTE_SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>")
BYTE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_tokenizer() -> Tokenizer:
    """256 byte tokens (ids 0-255) then <|bos|> 256, <|eos|> 257, <|pad|> 258; no merges, no download."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # Order the 256 byte symbols by the byte each stands for, so id == byte value.
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(BYTE_SPECIALS))
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 256)])
    config = {"bos_token": BYTE_SPECIALS[0], "eos_token": BYTE_SPECIALS[1], "pad_token": BYTE_SPECIALS[2]}
    return Tokenizer(tok, config, BYTE_CHAT_TEMPLATE)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the ByteLevel pre-tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))
