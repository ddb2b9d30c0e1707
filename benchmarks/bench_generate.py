"""Generation speed on one GPU: jaxmodels vs transformers, against the HBM roofline.

Real-size configurations with random bf16 weights (nothing is downloaded):
  deepseek-v2-lite  27 layers, hidden 2048, 64 routed experts (top-6) + 2 shared, MLA kv_lora_rank 512
  stablelm-3b       32 layers, hidden 2560, partial rotary 0.25
  deepseek-v3-3l    DeepSeek-V3 at full width (hidden 7168, 128 heads, 256 experts top-8), 3 layers
                    (1 dense + 2 MoE)

Measured: prefill tokens/s (1x2048 and 8x512; the prompt's forward pass filling the cache and the last
position's logits, for both implementations, as generation runs it) and decode tokens/s at batch 1, 8, 32
(prompt 128, 128 new tokens; a decode step's time is (t(128 new) - t(1 new)) / 127 with one compiled program). With
--compare-hf, transformers runs the same configuration (bf16, sdpa, random weights) on the same GPU in
the same invocation. Each (implementation, model) runs in its own subprocess so GPU memory is returned
between them.

Roofline: a decode step must read every weight its tokens use (all non-expert weights, the lm_head,
and per MoE layer the experts its tokens pick: E * (1 - (1 - k/E)^batch) expected distinct experts under
uniform routing) plus the cache of every row (prompt + on average half the new tokens). floor = bytes /
bandwidth, with bandwidth the larger of two probes over 4 GiB in the same run: an elementwise copy (bytes read +
written) and a read-only row sum (a decode step mostly reads; on an H200 the copy gave 2.9-3.0 TB/s, the read
3.3-3.8). "% roofline" = floor / measured step time. (Until 2026-12-04 21:30 UTC the copy alone was the
ceiling, which made every fraction ~1.2x higher; torch's copy reaches 4.3 TB/s on the same H200s.)

  python benchmarks/bench_generate.py --compare-hf                  # full table, appended to RESULTS.md
  python benchmarks/bench_generate.py --models stablelm-3b --no-write
  python benchmarks/bench_generate.py --models stablelm-3b --prefill 1x2048 --decode-batches "" --attention cudnn_packed
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

from common import fmt, median  # noqa: E402
from jaxmodels.plan import PRESET_CONFIGS  # noqa: E402

# The measured models, from jaxmodels.plan's list of real-size configurations (copies: BENCH_SMOKE shrinks them).
MODELS = {
    "deepseek-v2-lite": dict(PRESET_CONFIGS["deepseek-v2-lite"]),
    "stablelm-3b": dict(PRESET_CONFIGS["stablelm-3b"]),
    "deepseek-v3-3l": dict(PRESET_CONFIGS["deepseek-v3"], num_hidden_layers=3, first_k_dense_replace=1),
}
PREFILL = [(1, 2048), (8, 512)]
DECODE_BATCHES = [1, 8, 32]
PROMPT = 128
NEW = 128
if os.environ.get("BENCH_SMOKE"):  # a CPU smoke run of the script itself: tiny shapes, same code paths
    for _cfg in MODELS.values():
        _cfg.update(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=4)
        if "kv_lora_rank" in _cfg:
            _cfg.update(moe_intermediate_size=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
                        v_head_dim=16, q_lora_rank=_cfg["q_lora_rank"] and 24)
    PREFILL, DECODE_BATCHES, PROMPT, NEW = [(1, 64), (2, 32)], [1, 4], 16, 8


# ------------------------------------------------------------------------------------------------------
# Byte counting (no device needed)
# ------------------------------------------------------------------------------------------------------

def param_counts(name: str) -> dict:
    """Parameter counts: total, routed experts (per MoE layer, per expert), embedding table."""
    from jaxmodels.config import DeepseekConfig, config_from_hf
    cfg = config_from_hf(MODELS[name])
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxmodels.model import abstract_model
    state = nnx.state(abstract_model(cfg, jnp.bfloat16))
    total = sum(math.prod(v.shape) for _, v in nnx.to_flat_state(state))
    heads = cfg.num_attention_heads
    attn_dim = heads * ((cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) / 2 if isinstance(
        cfg, DeepseekConfig) else cfg.head_dim)  # per token and key: (q.k + p.v) / 2 multiply-adds per head
    out = dict(total=total, embed=cfg.vocab_size * cfg.hidden_size, moe_layers=0, experts=0, expert=0, k=0,
               attn_dim=attn_dim, layers=cfg.num_hidden_layers)
    if isinstance(cfg, DeepseekConfig) and cfg.is_moe:
        out.update(moe_layers=cfg.num_moe_layers, experts=cfg.n_routed_experts, k=cfg.num_experts_per_tok,
                   expert=3 * cfg.hidden_size * cfg.moe_intermediate_size)
    from jaxmodels.cache import bytes_per_token
    out["cache_bytes_per_token"] = bytes_per_token(cfg, jnp.bfloat16)
    del jax
    return out


def prefill_flops_per_token(counts: dict, seq: int) -> float:
    """Forward FLOPs per prompt token: 2 per weight the token uses (the k routed experts it picks, not the
    embedding table) plus causal attention (2 matmuls over on average seq / 2 keys)."""
    routed_total = counts["moe_layers"] * counts["experts"] * counts["expert"]
    used = counts["total"] - routed_total - counts["embed"] + counts["moe_layers"] * counts["k"] * counts["expert"]
    return 2 * used + 2 * 2 * counts["attn_dim"] * seq / 2 * counts["layers"]


def decode_floor_bytes(counts: dict, batch: int, prompt: int = PROMPT, new: int = NEW) -> float:
    bf16 = 2
    routed_total = counts["moe_layers"] * counts["experts"] * counts["expert"]
    dense = counts["total"] - routed_total - counts["embed"]  # the embedding table is only gathered
    used = 0.0
    if counts["experts"]:
        e, k = counts["experts"], counts["k"]
        used = counts["moe_layers"] * e * (1 - (1 - k / e) ** batch) * counts["expert"]
    cache = batch * (prompt + new / 2) * counts["cache_bytes_per_token"]
    return (dense + used) * bf16 + cache


# ------------------------------------------------------------------------------------------------------
# Workers
# ------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _init_fns(dtype_name: str, ndim: int):
    """Jitted random-block maker and in-place block writer, built once per (dtype, rank): building them
    inside random_normal made every parameter recompile both (about 4 minutes of a v2-lite run)."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(dtype_name)
    make = jax.jit(lambda k, std, s: jax.random.normal(k, s, jnp.float32).astype(dtype) * std.astype(dtype),
                   static_argnums=2)
    put = jax.jit(lambda buf, v, idx: jax.lax.dynamic_update_slice(buf, v, idx + (0,) * (ndim - len(idx))),
                  donate_argnums=0)
    return make, put


def random_normal(key, shape, dtype, std=0.02, chunk_bytes=1 << 28):
    """normal(0, std) of `shape`, filled block by block so that no temporary (random bits, float32) is larger
    than about chunk_bytes. A block spans whole trailing sub-arrays: as many indices of the first axis whose
    sub-array fits as divide that axis evenly (one dispatch per ~256 MB, not per row)."""
    import jax
    import jax.numpy as jnp

    shape = tuple(shape)
    make, put = _init_fns(jnp.dtype(dtype).name, len(shape))
    std = jnp.float32(std)
    if math.prod(shape) * 4 <= chunk_bytes:
        return make(key, std, shape)
    axis = 0
    while axis < len(shape) - 1 and math.prod(shape[axis + 1:]) * 4 > chunk_bytes:
        axis += 1
    most = max(1, chunk_bytes // (4 * math.prod(shape[axis + 1:])))
    rows = max(d for d in range(1, min(most, shape[axis]) + 1) if shape[axis] % d == 0)
    block = (1,) * axis + (rows,) + shape[axis + 1:]
    starts = [range(d) for d in shape[:axis]] + [range(0, shape[axis], rows)]
    buf = jnp.zeros(shape, dtype)
    for n, idx in enumerate(itertools.product(*starts)):
        buf = put(buf, make(jax.random.fold_in(key, n), std, block), tuple(jnp.int32(i) for i in idx))
    return buf


def random_state(cfg, dtype, seed=0):
    """Random bf16 parameters (std 0.02; norms 1; biases 0) built leaf by leaf on the device."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxmodels.model import abstract_model
    graphdef, abstract = nnx.split(abstract_model(cfg, dtype))
    key = jax.random.key(seed)
    leaves = []
    for i, (path, var) in enumerate(nnx.to_flat_state(abstract)):
        name = ".".join(str(p) for p in path)
        shape, dt = var.shape, var.dtype
        parent = name.split(".")[-2] if len(path) > 1 else ""
        if "norm" in parent:
            value = jnp.ones(shape, dt)
        elif name.endswith("bias"):
            value = jnp.zeros(shape, dt)
        else:
            value = random_normal(jax.random.fold_in(key, i), shape, dt)
        leaves.append((path, var.replace(value=value)))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def _probe_gbs(fn, x, bytes_moved: int) -> float:
    """GB/s of jit(fn)(x) moving bytes_moved per call: median of 10 calls after a warm-up."""
    import jax
    f = jax.jit(fn)
    f(x).block_until_ready()
    ts = []
    for _ in range(10):
        t = time.perf_counter()
        f(x).block_until_ready()
        ts.append(time.perf_counter() - t)
    return bytes_moved / median(ts) / 1e9


def bandwidth_gbs() -> float:
    """Copy bandwidth: an elementwise op over 4 GiB, bytes read + written (one of the two ceiling probes)."""
    import jax.numpy as jnp
    x = jnp.ones((2 * 1024**3,), jnp.bfloat16)  # 4 GiB
    return _probe_gbs(lambda a: a * jnp.asarray(1.5, a.dtype), x, 2 * x.nbytes)


def read_bandwidth_gbs() -> float:
    """A read-bound probe beside the copy: row sums over 4 GiB (what a decode step mostly does, read). On an
    H200 (2026-12-04) this read 3.3-3.8 TB/s where the copy above gave 2.9-3.0 and torch's copy 4.3 (r+w)."""
    import jax.numpy as jnp
    x = jnp.ones((16, 8192, 16384), jnp.bfloat16)  # 4 GiB
    return _probe_gbs(lambda a: jnp.sum(a.astype(jnp.float32), axis=-1), x, x.nbytes)


def worker_ours(name: str, args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxmodels.config import config_from_hf
    from jaxmodels.generate import bucket, steps
    cfg = config_from_hf(MODELS[name])
    t0 = time.perf_counter()
    model = random_state(cfg, jnp.bfloat16)
    # prefill attention kernel ("auto": the shipped choice); --xla-options replaces generate's compiler options
    # (jaxmodels.options.GENERATE_COMPILER_OPTIONS; e.g. '{}' for XLA's defaults)
    model = model.with_options(scan=not args.no_scan, attention=args.attention,
                               **({"compiler_options": json.loads(args.xla_options)} if args.xla_options else {}))
    graphdef, state = nnx.split(model)
    jax.block_until_ready(state)
    res = {"device": jax.devices()[0].device_kind, "init_s": time.perf_counter() - t0, "prefill": {},
           "decode": {}, "compile_s": {}}
    print(f"[ours {name}] random init: {res['init_s']:.0f}s", flush=True)
    res["bandwidth_gbs"] = bandwidth_gbs()
    res["read_bandwidth_gbs"] = read_bandwidth_gbs()
    from jaxmodels.train.metrics import peak_flops
    res["peak_flops"] = peak_flops()
    rng = np.random.default_rng(0)

    for b, p in args.prefill:
        ids = rng.integers(10, cfg.vocab_size, (b, p)).astype(np.int32)
        mask = np.ones_like(ids)
        t = time.perf_counter()
        jax.block_until_ready(steps.prefill_program(model.options)(graphdef, state, ids, mask, p))
        res["compile_s"][f"prefill {b}x{p}"] = time.perf_counter() - t
        ts = []
        for _ in range(args.reps):
            t = time.perf_counter()
            jax.block_until_ready(steps.prefill_program(model.options)(graphdef, state, ids, mask, p))
            ts.append(time.perf_counter() - t)
        res["prefill"][f"{b}x{p}"] = b * p / median(ts)
        print(f"[ours {name}] prefill {b}x{p}: {b * p / median(ts):.0f} tok/s "
              f"(first call {res['compile_s'][f'prefill {b}x{p}']:.0f}s)", flush=True)
        if args.profile:
            from profile_summary import profile
            profile(lambda: steps.prefill_program(model.options)(graphdef, state, ids, mask, p), 2,
                    f"{name} prefill {b}x{p}",
                    os.path.join(args.out, f"profile_{name}_prefill_{b}x{p}.md") if args.out else None)

    def decode_rate(b, tag=""):
        ids = rng.integers(10, cfg.vocab_size, (b, PROMPT)).astype(np.int32)
        mask = np.ones_like(ids)
        cache_len = bucket(bucket(PROMPT) + NEW)

        def run(n):
            out, done = steps.generate_program(model.options)(
                state, ids, mask, np.int32(n), np.float32(1.0), np.float32(1.0), np.int32(0),
                np.asarray([-1], np.int32), np.int32(0), graphdef=graphdef, cache_len=cache_len, do_sample=False,
                top_k=0, stream=False)
            jax.block_until_ready(out)
            assert int(done) == n, (int(done), n)

        t = time.perf_counter()
        run(NEW)
        res["compile_s"][f"generate b{b}{tag}"] = time.perf_counter() - t
        t_full, t_one = [], []
        for _ in range(args.reps):
            t = time.perf_counter()
            run(NEW)
            t_full.append(time.perf_counter() - t)
            t = time.perf_counter()
            run(1)
            t_one.append(time.perf_counter() - t)
        step = (median(t_full) - median(t_one)) / (NEW - 1)
        print(f"[ours {name}{tag}] decode b{b}: {step * 1e3:.3f} ms/step, {b / step:.0f} tok/s "
              f"(first call {res['compile_s'][f'generate b{b}{tag}']:.0f}s)", flush=True)
        if args.profile and not tag:
            from profile_summary import profile
            # One "step" of the summary = one generate call: NEW decode steps + the prefill.
            profile(lambda: run(NEW), 1, f"{name} generate b{b} ({NEW} new tokens; divide by {NEW} for a decode step)",
                    os.path.join(args.out, f"profile_{name}_b{b}.md") if args.out else None)
        return step

    for b in args.decode_batches:
        res["decode"][str(b)] = decode_rate(b)

    if args.explore:
        # Variants: without dynamic-slice fusion (weights copied out of the layer stack), the gather
        # as an explicit copy + einsum, gather at batch 32 instead of the grouped matmul.
        res["explore"] = {}
        shipped = model

        def use(**changes):  # another Options: a new graphdef, so the programs compile anew
            nonlocal model, graphdef, state
            model = shipped.with_options(**changes)
            graphdef, state = nnx.split(model)

        use(compiler_options={})
        res["explore"]["no_dsf b1"] = decode_rate(1, tag=" no_dsf")
        if cfg.model_type.startswith("deepseek"):
            use(gather_form="einsum")
            for b in (1, 8):
                res["explore"][f"einsum_gather b{b}"] = decode_rate(b, tag=" einsum_gather")
            use(gather_max_slots=1 << 30)
            res["explore"]["gather b32"] = decode_rate(32, tag=" gather")
        use()
        if args.out:
            ids = np.ones((1, PROMPT), np.int32)
            lowered = steps.generate_program(model.options).lower(
                state, ids, ids, np.int32(4), np.float32(1), np.float32(1), np.int32(0), np.asarray([-1], np.int32),
                np.int32(0), graphdef=graphdef, cache_len=256, do_sample=False, top_k=0, stream=False)
            with open(os.path.join(args.out, f"hlo_{name}_b1.txt"), "w") as f:
                f.write(lowered.compile().as_text())
    return res


def worker_hf(name: str, args) -> dict:
    import torch
    import transformers

    raw = dict(MODELS[name])
    model_type = raw.pop("model_type")
    hf_cfg = transformers.AutoConfig.for_model(model_type, **raw)
    hf_cfg._attn_implementation = "sdpa"
    t0 = time.perf_counter()
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    with torch.device(dev):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16,
                                                              attn_implementation="sdpa").eval()
    sync()
    res = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "init_s": time.perf_counter() - t0, "prefill": {}, "decode": {}}
    g = torch.Generator().manual_seed(0)

    def timed(fn):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    with torch.no_grad():
        for b, p in args.prefill:
            ids = torch.randint(10, hf_cfg.vocab_size, (b, p), generator=g).to(dev)
            # The last position's logits only, as transformers' generate() runs its prefill (and as ours does):
            # the full [b, p, vocab] logits would add a vocab-sized matmul per token to transformers' time.
            fn = lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1)  # noqa: E731
            timed(fn)
            ts = [timed(fn) for _ in range(args.reps)]
            res["prefill"][f"{b}x{p}"] = b * p / median(ts)
            print(f"[hf {name}] prefill {b}x{p}: {b * p / median(ts):.0f} tok/s", flush=True)
        n = args.hf_new_tokens
        for b in args.decode_batches:
            ids = torch.randint(10, hf_cfg.vocab_size, (b, PROMPT), generator=g).to(dev)
            mask = torch.ones_like(ids)

            def gen(k, cache=None):
                kw = {} if cache in (None, "dynamic") else {"cache_implementation": cache}
                return lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=k, min_new_tokens=k,
                                              do_sample=False, pad_token_id=0, **kw)

            cache = args.hf_cache
            try:  # transformers' static cache (and the compiled decode it turns on) where the model has one
                timed(gen(2, cache))
            except Exception as e:  # noqa: BLE001 - any failure: say so and use the dynamic cache
                print(f"[hf {name}] cache_implementation={cache!r} failed ({type(e).__name__}: {str(e)[:120]}); "
                      f"dynamic cache instead", flush=True)
                cache = "dynamic"
                timed(gen(2, cache))
            res.setdefault("cache", {})[str(b)] = cache
            gen = functools.partial(gen, cache=cache)
            timed(gen(n))  # a compiled decode (static cache) may specialise on the length: warm it too
            t_full = median([timed(gen(n)) for _ in range(max(1, args.reps - 1))])
            t_one = median([timed(gen(1)) for _ in range(max(1, args.reps - 1))])
            step = (t_full - t_one) / (n - 1)
            res["decode"][str(b)] = step
            print(f"[hf {name}] decode b{b} ({cache} cache): {step * 1e3:.2f} ms/step, {b / step:.0f} tok/s",
                  flush=True)
    return res


# ------------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------------

def run_worker(kind: str, name: str, args) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--models", name, "--reps", str(args.reps),
           "--hf-new-tokens", str(args.hf_new_tokens), "--decode-batches", ",".join(map(str, args.decode_batches)),
           "--hf-cache", args.hf_cache]
    if args.prefill:
        cmd += ["--prefill", ",".join(f"{b}x{p}" for b, p in args.prefill)]
    else:
        cmd.append("--no-prefill")
    if args.explore:
        cmd.append("--explore")
    if args.xla_options:
        cmd += ["--xla-options", args.xla_options]
    if args.no_scan:
        cmd.append("--no-scan")
    cmd += ["--attention", args.attention]
    if args.profile:
        cmd.append("--profile")
    if args.out:
        cmd += ["--out", args.out]
    env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_MEM_FRACTION="0.92", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result, lines = None, []
    for line in proc.stdout:  # stream the worker's progress as it comes
        line = line.rstrip("\n")
        lines.append(line)
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
        elif "Warning" not in line and "warn(" not in line:
            print(line, flush=True)
    proc.wait()
    if proc.returncode or result is None:
        print(f"!! {kind} {name} failed (rc {proc.returncode}) after {time.perf_counter() - t:.0f}s", flush=True)
        if args.out:
            with open(os.path.join(args.out, f"fail_{kind}_{name}.log"), "w") as f:
                f.write("\n".join(lines))
        return None
    print(f"-- {kind} {name} done in {time.perf_counter() - t:.0f}s", flush=True)
    return result


def ceiling_gbs(res: dict) -> float:
    """The "% roofline" bandwidth of one worker's results: the larger of its copy and read-only probes."""
    return max(res["bandwidth_gbs"], res.get("read_bandwidth_gbs") or 0.0)


def table(results: dict, args) -> str:
    rows = ["| model | measurement | jaxmodels tok/s | transformers tok/s | ratio | % HBM roofline / MFU |",
            "| --- | --- | ---: | ---: | ---: | ---: |"]
    for name in args.models:
        ours, hf = results.get(("ours", name)), results.get(("hf", name))
        counts = param_counts(name)
        bw = ceiling_gbs(ours) * 1e9 if ours else None
        for b, p in args.prefill:
            key = f"{b}x{p}"
            o = ours["prefill"].get(key) if ours else None
            h = hf["prefill"].get(key) if hf else None
            peak = ours.get("peak_flops") if ours else None
            mfu = o * prefill_flops_per_token(counts, p) / peak if o and peak else None
            rows.append(f"| {name} | prefill {key} | {fmt(o)} | {fmt(h)} | {fmt(o / h if o and h else None, '.2f')} | "
                        f"{f'{100 * mfu:.0f}% MFU' if mfu else ''} |")
        for b in args.decode_batches:
            o = ours["decode"].get(str(b)) if ours else None
            h = hf["decode"].get(str(b)) if hf else None
            roof = decode_floor_bytes(counts, b) / bw / o if (o and bw) else None
            rows.append(f"| {name} | decode b{b} (prompt {PROMPT}, {NEW} new) | {fmt(b / o if o else None)} | "
                        f"{fmt(b / h if h else None)} | {fmt(h / o if o and h else None, '.1f')} | "
                        f"{fmt(100 * roof if roof else None, '.0f')} |")
    return "\n".join(rows)


def main():
    from jaxmodels.layers.attention import ATTENTION_IMPLS  # (no device is touched by the import)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {list(MODELS)}")
    ap.add_argument("--compare-hf", action="store_true", help="also run transformers (bf16, sdpa) on the same GPU")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--hf-new-tokens", type=int, default=32, help="new tokens per transformers decode timing")
    ap.add_argument("--decode-batches", default=",".join(map(str, DECODE_BATCHES)),
                    help="comma-separated decode batch sizes")
    ap.add_argument("--no-prefill", action="store_true", help="skip the prefill timings")
    ap.add_argument("--prefill", default=",".join(f"{b}x{p}" for b, p in PREFILL),
                    help="comma-separated prefill shapes BATCHxLENGTH")
    ap.add_argument("--xla-options", help="JSON dict of XLA compiler options for our programs instead of "
                    "jaxmodels.options.GENERATE_COMPILER_OPTIONS (Options.compiler_options), e.g. '{\"xla_gpu_enable_dynamic_slice_fusion\": true}'")
    ap.add_argument("--no-scan", action="store_true",
                    help="ours: layers unrolled in the program (Options(scan=False)) instead of a scan over the stack")
    ap.add_argument("--attention", default="auto", choices=ATTENTION_IMPLS,
                    help="ours: the prefill attention implementation (jaxmodels.layers.attention), for A/B runs")
    ap.add_argument("--explore", action="store_true", help="also time MoE decode variants (gather forms, no dynamic-slice fusion)")
    ap.add_argument("--hf-cache", default="static", choices=["static", "dynamic"],
                    help="transformers' decode cache (static falls back to dynamic where a model has none)")
    ap.add_argument("--profile", action="store_true",
                    help="ours: the device-time breakdown of each prefill and of a decode step at each batch "
                         "(benchmarks/profile_summary.py)")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for logs / HLO (default $OUT)")
    ap.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    ap.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    args.decode_batches = [int(b) for b in args.decode_batches.split(",") if b]
    args.prefill = [] if args.no_prefill else [tuple(int(n) for n in bp.split("x")) for bp in args.prefill.split(",") if bp]
    for m in args.models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {list(MODELS)}")

    if args.worker:
        fn = worker_ours if args.worker == "ours" else worker_hf
        print("RESULT " + json.dumps(fn(args.models[0], args)), flush=True)
        return

    if args.out:
        os.makedirs(args.out, exist_ok=True)
    results = {}
    for name in args.models:
        if args.compare_hf:
            results[("hf", name)] = run_worker("hf", name, args)
        results[("ours", name)] = run_worker("ours", name, args)
        if args.out:  # partial results survive a run cut short
            with open(os.path.join(args.out, "bench.json"), "w") as f:
                json.dump({f"{k[0]}:{k[1]}": v for k, v in results.items()}, f, indent=1)
    if args.out:
        with open(os.path.join(args.out, "bench.json"), "w") as f:
            json.dump({f"{k[0]}:{k[1]}": v for k, v in results.items()}, f, indent=1)
    text = table(results, args)
    any_res = next((r for r in results.values() if r), None)
    device = any_res["device"] if any_res else "?"
    bw = next((r["bandwidth_gbs"] for (k, _), r in results.items() if r and k == "ours"), None)
    read_bw = next((r.get("read_bandwidth_gbs") for (k, _), r in results.items() if r and k == "ours"), None)
    header = (f"### {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC — {device}, "
              f"copy bandwidth {fmt(bw)} GB/s, read-only probe {fmt(read_bw)} GB/s (% roofline against the "
              f"larger)\n\n"
              f"`python benchmarks/bench_generate.py {' '.join(sys.argv[1:])}`\n")
    print()
    print(header)
    print(text)
    for (kind, name), r in results.items():
        if r and r.get("explore"):
            print(f"\nexplore {name}: " + ", ".join(f"{k}: {v * 1e3:.3f} ms/step" if v < 1 else f"{k}: {v:.0f}"
                                                   for k, v in r["explore"].items()))
        if r and r.get("compile_s"):
            print(f"compile {kind} {name}: " + ", ".join(f"{k}: {v:.0f}s" for k, v in r["compile_s"].items()))
    if args.out:
        with open(os.path.join(args.out, "results_fragment.md"), "w") as f:
            f.write("\n" + header + "\n" + text + "\n")
    if not args.no_write:
        with open(os.path.join(ROOT, "benchmarks", "RESULTS.md"), "a") as f:
            f.write("\n" + header + "\n" + text + "\n")


if __name__ == "__main__":
    main()
