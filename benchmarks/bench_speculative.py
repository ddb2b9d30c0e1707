"""Self-speculative decoding with DeepSeek-V3's MTP layer: what a step costs, and what it buys.

1. Step cost at DeepSeek-V3 full width (hidden 7168, 128 heads, 256 experts top-8), 3 layers (1 dense + 2
   MoE) + 1 MTP layer, random bf16 weights, batch 1, prompt 128: the time of one plain decode step (1 token
   through the main model) against one speculative step (2 tokens verified by the main model + the MTP
   layer drafting from 2 positions + the acceptance logic), both measured inside the one compiled
   `generate` program as (t(N new) - t(1 new)) / (N - 1). Random MTP weights accept almost nothing, so a
   speculative step there produces ~1 token: the step-cost ratio is what matters; with acceptance a the
   speculative speedup is (1 + a) * t_plain / t_spec.
2. With --model DIR (a checkpoint with its MTP layer): greedy decode tokens/s on the given prompt(s) with
   speculative=True, with speculative=False as it runs for a model with MTP layers ("paired": the verify's
   2-token step shapes, bit-identical output) and with plain 1-token steps ("one-token": what a model without
   MTP layers runs; faster, but on a GPU its rounding can flip near-tied tokens), the measured acceptance
   rate, and whether the outputs are identical.

  python benchmarks/bench_speculative.py                      # step-cost table (one GPU)
  python benchmarks/bench_speculative.py --model /path/to/DeepSeek-V3-dir --prompt "..." --new 256
  BENCH_SMOKE=1 python benchmarks/bench_speculative.py        # CPU smoke run of the script, tiny shapes
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

from bench_generate import MODELS, random_normal  # noqa: E402  (BENCH_SMOKE shrinks MODELS there)
from common import median  # noqa: E402

PROMPT = 16 if os.environ.get("BENCH_SMOKE") else 128
NEW = 8 if os.environ.get("BENCH_SMOKE") else 64
REPEATS = 1 if os.environ.get("BENCH_SMOKE") else 5


def random_model(name: str, num_mtp_layers: int = 1, seed: int = 0):
    """Random bf16 model with MTP layers (std 0.02; norms 1; biases 0), built leaf by leaf on the device."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxmodels.config import config_from_hf
    from jaxmodels.model import abstract_model

    cfg = config_from_hf(dict(MODELS[name]))
    graphdef, abstract = nnx.split(abstract_model(cfg, jnp.bfloat16, num_mtp_layers=num_mtp_layers))
    key = jax.random.key(seed)
    leaves = []
    for i, (path, var) in enumerate(nnx.to_flat_state(abstract)):
        names = [str(p) for p in path]
        if any("norm" in n for n in names[-2:-1]):
            value = jnp.ones(var.shape, var.dtype)
        elif names[-1] == "bias" or names[-1] == "e_score_correction_bias":
            value = jnp.zeros(var.shape, var.dtype)
        else:
            value = random_normal(jax.random.fold_in(key, i), var.shape, var.dtype)
        leaves.append((path, var.replace(value=value)))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def timed_generate(model, ids, new: int, speculative: bool, repeats: int = REPEATS):
    """Median wall time of generate(max_new_tokens=new) (compiled once first), and its stats."""
    import jaxmodels

    kw = dict(max_new_tokens=new, eos_token_id=[], speculative=speculative, return_stats=True)
    jaxmodels.generate(model, ids, **kw)  # compile
    ts, stats = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out, stats = jaxmodels.generate(model, ids, **kw)
        ts.append(time.perf_counter() - t)
    return median(ts), out, stats


# "one-token": plain greedy with 1-token steps (what a model without MTP layers runs); "paired": plain greedy as
# it runs for a model with MTP layers (the verify's 2-token step shapes, so its output is bit for bit the
# speculative one on any backend); "speculative": speculative=True.
MODES = ("one-token", "paired", "speculative")


@contextlib.contextmanager
def plain_mode(mode: str):
    """Runs generate's plain greedy loop in `mode` (one-token or the default paired) for a model with MTP."""
    import jax

    from jaxmodels.generate import steps

    has_mtp = steps._has_mtp
    if mode == "one-token":
        steps._has_mtp = lambda m: False
    jax.clear_caches()  # read at trace time
    try:
        yield
    finally:
        steps._has_mtp = has_mtp
        jax.clear_caches()


def step_costs(args):
    import jax
    import numpy as np

    name = "deepseek-v3-3l"
    t0 = time.perf_counter()
    model = random_model(name)
    print(f"device {jax.devices()[0].device_kind}; {name} + 1 MTP layer, random bf16, built in "
          f"{time.perf_counter() - t0:.0f}s", flush=True)
    vocab = MODELS[name]["vocab_size"]
    rows = []
    for b in args.batches:
        ids = np.random.default_rng(0).integers(2, vocab, size=(b, PROMPT))
        # Prompt 128 + 64 new: every run gets the same 256-slot cache, so the attention work per step is the same.
        res = {}
        for mode in MODES:
            with plain_mode(mode):
                t1, _, _ = timed_generate(model, ids, 1, mode == "speculative")
                tn, _, st = timed_generate(model, ids, NEW, mode == "speculative")
            res[mode] = ((tn - t1) / st["steps"], st)
        rows.append((b, res["one-token"][0], res["paired"][0], res["speculative"][0],
                     res["speculative"][1]["acceptance_rate"]))
    print("\n| batch | plain step, 1 token (ms) | plain step, paired (ms) | speculative step: verify 2 + MTP draft (ms) "
          "| ratio to 1-token | break-even acceptance | speedup at 85% acceptance | acceptance (random weights) |")
    print("|---|---|---|---|---|---|---|---|")
    for b, one, paired, spec, acc in rows:
        ratio = spec / one
        print(f"| {b} | {one * 1e3:.2f} | {paired * 1e3:.2f} | {spec * 1e3:.2f} | {ratio:.2f} | "
              f"{max(0.0, ratio - 1):.0%} | {1.85 / ratio:.2f}x | {acc:.0%} |")


def checkpoint_speed(args):
    import numpy as np

    import jaxmodels
    from jaxmodels.generate_cli import load

    model, tok = load(args.model, args.dtype)
    prompts = args.prompt or ["def read_config(path):"]  # the embedded model was trained on Python code
    encoded = [tok.encode(p) for p in prompts]
    cfg = model.config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    ids, mask = tok.batch(encoded, pad)
    print(f"{args.model}: batch {len(prompts)}, prompt {ids.shape[1]} tokens, {args.new} new tokens (greedy, no EOS)")
    out = {}
    for mode in MODES:
        kw = dict(attention_mask=mask, max_new_tokens=args.new, eos_token_id=[], speculative=mode == "speculative",
                  return_stats=True)
        with plain_mode(mode):
            jaxmodels.generate(model, ids, **kw)
            ts = []
            for _ in range(REPEATS):
                t = time.perf_counter()
                res, st = jaxmodels.generate(model, ids, **kw)
                ts.append(time.perf_counter() - t)
        out[mode] = (median(ts), res, st)
    same = np.array_equal(out["paired"][1], out["speculative"][1])
    same_one = np.array_equal(out["one-token"][1], out["speculative"][1])
    print("\n| mode | tokens/s (per row) | forward passes | acceptance |")
    print("|---|---|---|---|")
    for mode, (t, _, st) in out.items():
        acc = f"{st['acceptance_rate']:.1%}" if mode == "speculative" else "-"
        print(f"| {mode} | {args.new / t:.1f} | {st['steps'] + 1} | {acc} |")
    print(f"\nspeedup {out['paired'][0] / out['speculative'][0]:.2f}x over paired plain greedy, "
          f"{out['one-token'][0] / out['speculative'][0]:.2f}x over 1-token plain greedy; outputs identical: "
          f"{same} (paired), {same_one} (1-token)")
    print("sample:", repr(tok.decode([int(t) for t in out["speculative"][1][0, ids.shape[1]:]])[:300]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint dir with an MTP layer: measure tokens/s with/without speculative")
    ap.add_argument("--prompt", action="append", default=[])
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[1])
    args = ap.parse_args(argv)
    if args.model:
        checkpoint_speed(args)
    else:
        step_costs(args)


if __name__ == "__main__":
    main()
