"""`jaxmodels.batch_generate`: text requests in, completion records out (in finish order), over the engine.

A request is a dict: {"id", "prompt": str} or {"id", "messages": [{"role", "content"}, ...]} (the tokenizer's
chat template), and optionally "max_new_tokens", "temperature" (0 = greedy), "top_p", "top_k", "stop" (a
string or a list of strings) and "seed". A result is {"id", "completion", "finish_reason": "eos" | "stop" |
"length", "prompt_tokens", "completion_tokens"}; a request that cannot run gives {"id", "error"} instead.
"""

from __future__ import annotations

import numbers
from typing import Iterable, Iterator

from jaxmodels.generate.engine import Engine, Request
from jaxmodels.tokenizer import continuation

FIELDS = {"id", "prompt", "messages", "max_new_tokens", "temperature", "top_p", "top_k", "stop", "seed"}


class RequestError(ValueError):
    """A request dict that cannot be read (the message names the field)."""


def _number(d, key, kind, default, lo=None, hi=None, lo_open=False):
    v = d.get(key, default)
    ok = isinstance(v, numbers.Integral) if kind is int else isinstance(v, numbers.Real)
    if isinstance(v, bool) or not ok or (lo is not None and (v <= lo if lo_open else v < lo)) or \
            (hi is not None and v > hi):
        bounds = "" if lo is None else f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise RequestError(f'"{key}" must be {"an integer" if kind is int else "a number"} {bounds}, got {v!r}')
    return v


def to_request(d: dict, tok, defaults: dict) -> tuple[Request, list[str]]:
    """A request dict -> (engine Request with the prompt tokenized, its stop strings). Raises RequestError."""
    if not isinstance(d, dict):
        raise RequestError(f"a request must be a JSON object, got {type(d).__name__}")
    if "id" not in d:
        raise RequestError('missing "id"')
    unknown = set(d) - FIELDS
    if unknown:
        raise RequestError(f"unknown field(s) {sorted(unknown)}; the fields are {sorted(FIELDS)}")
    if ("prompt" in d) == ("messages" in d):
        raise RequestError('give exactly one of "prompt" (a string) or "messages" (a list of {"role", "content"})')
    if "prompt" in d:
        if not isinstance(d["prompt"], str):
            raise RequestError(f'"prompt" must be a string, got {type(d["prompt"]).__name__}')
        ids = tok.encode(d["prompt"])
    else:
        msgs = d["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise RequestError('"messages" must be a list of {"role": ..., "content": ...} objects')
        ids = tok.apply_chat_template(msgs)
    stop = d.get("stop", defaults.get("stop")) or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError('"stop" must be a non-empty string or a list of them')
    req = Request(
        id=d["id"], tokens=list(ids),
        max_new_tokens=_number(d, "max_new_tokens", int, defaults.get("max_new_tokens", 256), lo=1),
        temperature=float(_number(d, "temperature", float, defaults.get("temperature", 0.0), lo=0)),
        top_p=float(_number(d, "top_p", float, defaults.get("top_p", 1.0), lo=0, hi=1, lo_open=True)),
        top_k=int(_number(d, "top_k", int, defaults.get("top_k", 0), lo=0)),
        seed=int(_number(d, "seed", int, defaults.get("seed", 0), lo=0, hi=2**32 - 1)),
    )
    if stop:
        req.stop = _stop_check(tok, stop)
    return req, stop


def _stop_check(tok, stop: list[str]):
    """A host callback: True once the decoded tail of the generated tokens holds a stop string. Only the last
    few tokens are decoded per step (a stop string of n characters spans at most n + 2 tokens)."""
    span = max(len(s) for s in stop) + 2

    def check(tokens: list[int]) -> bool:
        tail = tok.decode(tokens[-span:])
        return any(s in tail for s in stop)
    return check


def _cut(text: str, stop: list[str]) -> str:
    at = [text.find(s) for s in stop if s in text]
    return text[:min(at)] if at else text


def batch_generate(model, tokenizer, requests: Iterable[dict], slots: int = 64, *, cache_len: int | None = None,
                   buckets=(256, 512, 1024, 2048), defaults: dict | None = None, engine: Engine | None = None,
                   on_error=None, speculative: bool = False) -> Iterator[dict]:
    """Runs request dicts (see the module docstring) through a continuous-batching engine of `slots` cache rows
    and yields a result dict for each, as they finish. Requests are read from the iterable only as slots free
    up, so a generator over a huge file never sits in memory.

    model: a jaxmodels CausalLM (with a mesh: slots split over its batch axes); tokenizer: jaxmodels Tokenizer.
    cache_len: cache entries per slot (default: the model's max_position_embeddings). defaults: values for the
    optional request fields (e.g. {"max_new_tokens": 128}). on_error(request_dict, message): called for a
    request dict that cannot be read (default: raise RequestError); its result is then {"id", "error"}.
    speculative: greedy self-speculative decoding with DeepSeek-V3's MTP layer (same tokens, fewer steps).
    """
    cfg = model.config
    eos = set(cfg.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    if engine is None:
        engine = Engine(model, slots=slots, cache_len=cache_len, buckets=buckets, eos=sorted(eos),
                        speculative=speculative)
    defaults = dict(defaults or {})
    stops: dict = {}
    prompts: dict = {}
    bad: list[dict] = []

    def feed():
        for key, d in enumerate(requests):
            try:
                req, stop = to_request(d, tokenizer, defaults)
            except RequestError as e:
                if on_error is None:
                    raise
                on_error(d, str(e))
                bad.append({"id": d.get("id") if isinstance(d, dict) else None, "error": str(e)})
                continue
            stops[key], prompts[key] = stop, req.tokens
            req.id = (key, req.id)
            yield req

    for r in engine.run(feed()):
        while bad:
            yield bad.pop(0)
        key, rid = r.id
        stop, prompt = stops.pop(key), prompts.pop(key)
        if r.finish_reason == "error":
            yield {"id": rid, "error": r.error}
            continue
        text = continuation(tokenizer, prompt, r.tokens)
        if r.finish_reason == "stop":
            text = _cut(text, stop)
        yield {"id": rid, "completion": text, "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
               "completion_tokens": len(r.tokens)}
    while bad:
        yield bad.pop(0)
