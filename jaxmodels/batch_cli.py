"""`jaxmodels batch`: a JSONL file of requests in, a JSONL file of completions out, by continuous batching.

  jaxmodels batch --model PATH --input prompts.jsonl --output completions.jsonl [--slots 64] [--mesh data=8]
                  [--max-new-tokens 256] [--temperature 0] [--top-p 1] [--top-k 0] [--cache-len N]
                  [--on-bad-line skip|fail] [--speculative]

Input lines: {"id": ..., "prompt": "..."} or {"id": ..., "messages": [...]} (chat template), optionally with
"max_new_tokens", "temperature", "top_p", "top_k", "stop" (strings), "seed" (the flags give the defaults).
Output lines, in the order requests finish: {"id", "completion", "finish_reason": "eos"|"stop"|"length",
"prompt_tokens", "completion_tokens"}, or {"id", "error"} for a request that cannot run (e.g. a prompt longer
than the cache).

The input is read as slots free up (never whole); each output line is appended and flushed as its request
finishes. Run the same command again after an interruption (even a SIGKILL): the ids already in the output
are skipped, and a last line cut off mid-write is removed first. A bad input line (not JSON, no id, no prompt)
is reported on stderr with its line number and skipped, or stops the job with --on-bad-line fail.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from jaxmodels.units import DTYPES


class BadLine(Exception):
    pass


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the embedded model)")
    p.add_argument("--input", required=True, help="JSONL requests, one per line")
    p.add_argument("--output", required=True, help="JSONL results, appended (an existing file: its ids are skipped)")
    p.add_argument("--slots", type=int, default=64, help="requests decoded together (cache rows)")
    p.add_argument("--cache-len", type=int, default=None,
                   help="cache entries per request: prompt + new tokens (default: max_position_embeddings)")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. data=8 (slots split over data)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="default for requests without max_new_tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="default temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="parameter dtype (default: the checkpoint's)")
    p.add_argument("--on-bad-line", choices=("skip", "fail"), default="skip",
                   help="a line that is not a valid request: report it and skip it (default), or stop the job")
    p.add_argument("--speculative", action="store_true",
                   help="greedy self-speculative decoding with the checkpoint's DeepSeek-V3 MTP layer (same tokens)")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")


def done_ids(path: str) -> set:
    """Ids already in the output. A last line without its newline (a write cut off by a kill) is removed."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            f.truncate(keep)
            data = data[:keep]
    out = set()
    for line in data.splitlines():
        if line.strip():
            out.add(_key(json.loads(line)["id"]))
    return out


def _key(rid):
    return json.dumps(rid, sort_keys=True)


def read_requests(path: str, skip: set, on_bad, counts: dict):
    """Yields request dicts from a JSONL file, one line at a time, skipping ids in `skip`. A line that is not a
    JSON object with an id goes to on_bad(line number, message)."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                on_bad(n, f"not JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(d, dict) or "id" not in d:
                on_bad(n, 'not a JSON object with an "id"')
                continue
            if _key(d["id"]) in skip:
                counts["skipped"] += 1
                continue
            yield Line(d, n)


class Line(dict):
    """A request dict that remembers its input line number (for the message of a bad field)."""

    def __init__(self, d: dict, line: int):
        super().__init__(d)
        self.line = line


class Progress:
    """One stderr line: requests done, requests/s, generated tokens/s."""

    def __init__(self, enabled: bool):
        self.enabled, self.t0, self.n, self.tokens, self.last = enabled, time.perf_counter(), 0, 0, 0.0

    def update(self, result: dict) -> None:
        self.n += 1
        self.tokens += result.get("completion_tokens", 0)
        now = time.perf_counter()
        if self.enabled and now - self.last > 0.5:
            self.last = now
            self.show(now)

    def show(self, now=None) -> None:
        dt = max((now or time.perf_counter()) - self.t0, 1e-9)
        print(f"\r{self.n} requests  {self.n / dt:.2f} req/s  {self.tokens / dt:.1f} tok/s", end="", file=sys.stderr,
              flush=True)

    def close(self) -> None:
        if self.enabled:
            self.show()
            print(file=sys.stderr)


def run(args) -> int:
    from jaxmodels.config import ConfigError
    from jaxmodels.convert.keymap import CheckpointError
    from jaxmodels.generate import GenerationError
    from jaxmodels.generate.batch import batch_generate
    from jaxmodels.sharding import ShardingError
    from jaxmodels.tokenizer import TokenizerError

    if not os.path.exists(args.input):
        print(f"error: --input {args.input} does not exist", file=sys.stderr)
        return 2
    try:
        skip = done_ids(args.output)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        print(f"error: --output {args.output} holds a line that is not a result record ({e}); give a new output "
              "file or remove that line", file=sys.stderr)
        return 2
    counts = {"skipped": 0, "bad": 0}

    def on_bad(n, msg):
        counts["bad"] += 1
        print(f"{args.input}:{n}: {msg}" + ("" if args.on_bad_line == "skip" else " (--on-bad-line fail)"),
              file=sys.stderr)
        if args.on_bad_line == "fail":
            raise BadLine(f"{args.input}:{n}: {msg}")

    def on_error(d, msg):
        on_bad(getattr(d, "line", "?"), msg)

    progress = Progress(not args.no_progress)
    try:
        model, tok = _load(args)
        defaults = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                    "top_k": args.top_k, "seed": args.seed}
        requests = read_requests(args.input, skip, on_bad, counts)
        with open(args.output, "a", encoding="utf-8") as out:
            for result in batch_generate(model, tok, requests, slots=args.slots,
                                         cache_len=args.cache_len, defaults=defaults, on_error=on_error,
                                         speculative=args.speculative):
                out.write(json.dumps(result, ensure_ascii=False) + "\n")
                out.flush()
                progress.update(result)
    except BadLine:
        progress.close()
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ConfigError, CheckpointError, GenerationError, TokenizerError, ShardingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    progress.close()
    if counts["skipped"]:
        print(f"skipped {counts['skipped']} requests already in {args.output}", file=sys.stderr)
    if counts["bad"]:
        print(f"{counts['bad']} bad input lines skipped", file=sys.stderr)
    return 0


def _load(args):
    from jaxmodels.generate_cli import load

    if args.mesh:
        import jaxmodels
        from jaxmodels import sharding
        from jaxmodels.convert.hf import resolve_checkpoint
        from jaxmodels.tokenizer import Tokenizer

        mesh = sharding.make_mesh(**sharding.parse_mesh(args.mesh))
        path = resolve_checkpoint(args.model or jaxmodels.default_model_dir())
        tok = Tokenizer.from_checkpoint(path)
        model = jaxmodels.from_pretrained(path, None if args.dtype is None else DTYPES[args.dtype], mesh=mesh,
                                          progress=False)
        return model, tok
    return load(args.model, args.dtype)
