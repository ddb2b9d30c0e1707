"""Batch inference on one GPU: the continuous-batching engine against static batches, ours and transformers'.

The workload (issue 24; fixed seed): N prompts of random tokens, lengths lognormal around 300 (clipped to
16-1536), 128 new tokens each, EOS off (every request runs to its limit); a "mixed" variant draws each
request's max_new_tokens from {16, 64, 128, 512}. Real-size configurations with random bf16 weights
(bench_generate.MODELS; nothing is downloaded).

Implementations, each in its own subprocess, the same GPU, one invocation:
  engine     jaxmodels' engine (`jaxmodels.generate.engine.Engine`, --slots slots)
  static     jaxmodels.generate over prompts sorted by length, in static batches of --batch
  hf_static  transformers' generate, the same sorted static batches (left padding, sdpa)
  hf_cb      transformers' generate_batch (continuous batching, paged attention) where the model runs it

Measured: wall time, output tokens/s, requests/s, time to first token p50/p99 (from the job's start), the
share of the wall time spent compiling (jax.monitoring's compile events), and for the engine its decode step
(ms, timed on the engine's state after the job, all slots decoding at the job's longest read length) against
the HBM roofline at that slot count (weights + the slots' average filled cache, bench_generate's floor and
bandwidth probes).

  python benchmarks/bench_batch.py                       # stablelm-3b and deepseek-v2-lite, 256 requests
  python benchmarks/bench_batch.py --quick --out $OUT    # stablelm-3b, 64 requests, 64 new tokens
  python benchmarks/bench_batch.py --tiny                # a tiny model on CPU: checks the script (BENCH_SMOKE=1)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

from common import fmt, run_worker, save_results  # noqa: E402

TINY = dict(model_type="stablelm", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
TINY_V2 = dict(model_type="deepseek_v2", vocab_size=512, hidden_size=64, intermediate_size=128,
               moe_intermediate_size=32, num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4,
               n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, kv_lora_rank=32, q_lora_rank=None,
               qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, topk_method="greedy",
               max_position_embeddings=512)
IMPLS = ("engine", "static", "hf_static", "hf_cb")


def model_config(name: str) -> dict:
    if name == "tiny":
        return dict(TINY)
    if name == "tiny-v2":
        return dict(TINY_V2)
    from bench_generate import MODELS
    return dict(MODELS[name])


def workload(n: int, new: int, mixed: bool, vocab: int, lo: int, hi: int, mean: float, seed: int = 0):
    """[(prompt ids, max_new_tokens)]: lengths lognormal around `mean` clipped to [lo, hi], random tokens."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(mean), 0.6, n)), lo, hi).astype(int)
    news = rng.choice([16, 64, 128, 512], n) if mixed else np.full(n, new)
    if mixed:
        news = np.minimum(news, 4 * new)
    return [(rng.integers(10, vocab, int(p)).tolist(), int(m)) for p, m in zip(lengths, news)]


def percentile(xs, q):
    import numpy as np
    return float(np.percentile(np.asarray(xs), q)) if xs else None


class CompileClock:
    """Seconds jax spends compiling (tracing, lowering, XLA) while it is installed."""

    EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/core/compile/jaxpr_trace_duration",
              "/jax/core/compile/jaxpr_to_mlir_module_duration")

    def __init__(self):
        import jax
        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on)

    def _on(self, event, duration, **kw):
        if event in self.EVENTS:
            self.seconds += duration


# ------------------------------------------------------------------------------------------------------
# Workers
# ------------------------------------------------------------------------------------------------------

def _our_model(args):
    import jax.numpy as jnp
    from bench_generate import random_state
    from jaxmodels.config import config_from_hf

    cfg = config_from_hf(model_config(args.models))
    dtype = jnp.float32 if args.models.startswith("tiny") else jnp.bfloat16
    return random_state(cfg, dtype), cfg


def worker_engine(args, work) -> dict:
    import jax
    import numpy as np

    from jaxmodels.generate.engine import Engine, Request, decode_program

    model, cfg = _our_model(args)
    cache_len = args.cache_len or min(cfg.max_position_embeddings,
                                      1 << (max(len(p) + m for p, m in work) - 1).bit_length())
    buckets = tuple(b for b in (256, 512, 1024, 2048) if b <= cache_len) or (cache_len,)
    engine = Engine(model, slots=args.slots, cache_len=cache_len, buckets=buckets, eos=[])
    clock = CompileClock()
    reqs = [Request(i, p, max_new_tokens=m) for i, (p, m) in enumerate(work)]
    t0 = time.perf_counter()
    results = list(engine.run(reqs))
    wall = time.perf_counter() - t0
    out = dict(wall_s=wall, tokens=sum(len(r.tokens) for r in results), requests=len(results),
               ttft=[r.first_token_s for r in results], compile_s=clock.seconds, stats=engine.stats,
               device=jax.devices()[0].device_kind, slots=args.slots, cache_len=cache_len)
    # The decode step alone: all slots decoding at the longest read length the job used.
    cache, mcache, st = engine._cache
    read_len = engine.read_lens[-1] if len(engine.read_lens) == 1 else max(
        n for n in engine.read_lens if n <= cache_len)
    fn = decode_program(engine.model.options)
    for _ in range(2):
        cache, mcache, st, tok = fn(engine.graphdef, engine.state, cache, mcache, st, read_len=read_len, sample=False)
    jax.block_until_ready(tok)
    t = time.perf_counter()
    steps = 20
    for _ in range(steps):
        cache, mcache, st, tok = fn(engine.graphdef, engine.state, cache, mcache, st, read_len=read_len, sample=False)
    jax.block_until_ready(tok)
    out["decode_step_s"] = (time.perf_counter() - t) / steps
    out["decode_read_len"] = read_len
    if not args.models.startswith("tiny") and jax.devices()[0].platform == "gpu":
        from bench_generate import bandwidth_gbs, decode_floor_bytes, param_counts, read_bandwidth_gbs

        counts = param_counts(args.models)
        mean_prompt = float(np.mean([len(p) for p, _ in work]))
        mean_new = float(np.mean([m for _, m in work]))
        floor = decode_floor_bytes(counts, args.slots, prompt=int(mean_prompt), new=int(mean_new))
        gbs = max(bandwidth_gbs(), read_bandwidth_gbs())
        out.update(floor_bytes=floor, bandwidth_gbs=gbs, roofline=floor / (gbs * 1e9) / out["decode_step_s"])
    return out


def worker_static(args, work) -> dict:
    import jax
    import numpy as np

    import jaxmodels

    model, cfg = _our_model(args)
    clock = CompileClock()
    order = sorted(range(len(work)), key=lambda i: len(work[i][0]))
    ttft, tokens = {}, 0
    t0 = time.perf_counter()
    for k in range(0, len(order), args.batch):
        rows = order[k:k + args.batch]
        p = max(len(work[i][0]) for i in rows)
        ids = np.zeros((len(rows), p), np.int32)
        mask = np.zeros((len(rows), p), np.int32)
        for r, i in enumerate(rows):
            ids[r, p - len(work[i][0]):] = work[i][0]
            mask[r, p - len(work[i][0]):] = 1
        new = max(work[i][1] for i in rows)
        seen = []

        def first(step, toks, seen=seen):
            if step == 0:
                seen.append(time.perf_counter() - t0)
        out = jaxmodels.generate(model, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[], pad_token_id=0,
                                 streamer=first)
        tokens += sum(min(work[i][1], out.shape[1] - p) for i in rows)
        for i in rows:
            ttft[i] = seen[0]
    wall = time.perf_counter() - t0
    return dict(wall_s=wall, tokens=tokens, requests=len(work), ttft=list(ttft.values()), compile_s=clock.seconds,
                device=jax.devices()[0].device_kind, batch=args.batch)


def _hf_model(args):
    import torch
    import transformers

    raw = model_config(args.models)
    model_type = raw.pop("model_type")
    hf_cfg = transformers.AutoConfig.for_model(model_type, **raw)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if args.models.startswith("tiny") else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(dev):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation="sdpa").eval()
    return model, dev


def worker_hf_static(args, work) -> dict:
    import torch

    model, dev = _hf_model(args)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    order = sorted(range(len(work)), key=lambda i: len(work[i][0]))
    ttft, tokens = [], 0

    class First:  # transformers' streamer protocol: put(prompt), then put(new tokens) per step
        def __init__(self):
            self.calls, self.t = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:
                sync()
                self.t = time.perf_counter() - t0

        def end(self):
            pass

    t0 = time.perf_counter()
    with torch.no_grad():
        for k in range(0, len(order), args.batch):
            rows = order[k:k + args.batch]
            p = max(len(work[i][0]) for i in rows)
            ids = torch.zeros((len(rows), p), dtype=torch.long)
            mask = torch.zeros((len(rows), p), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, p - len(work[i][0]):] = torch.tensor(work[i][0])
                mask[r, p - len(work[i][0]):] = 1
            new = max(work[i][1] for i in rows)
            first = First()
            out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, pad_token_id=0, streamer=first)
            sync()
            tokens += sum(min(work[i][1], out.shape[1] - p) for i in rows)
            ttft += [first.t] * len(rows)
    return dict(wall_s=time.perf_counter() - t0, tokens=tokens, requests=len(work), ttft=ttft, compile_s=0.0,
                device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", batch=args.batch)


def worker_hf_cb(args, work) -> dict:
    import torch
    from transformers import GenerationConfig

    model, dev = _hf_model(args)
    cfg = GenerationConfig(max_new_tokens=max(m for _, m in work), do_sample=False, eos_token_id=-1, pad_token_id=0)
    # generate_batch takes one generation config: per-request lengths are not expressible, so each request
    # runs to the longest limit and only its own max_new_tokens count as output.
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate_batch(inputs=[p for p, _ in work], generation_config=cfg, record_timestamps=True)
    wall = time.perf_counter() - t0
    ttft, tokens = [], 0
    for i, (rid, o) in enumerate(out.items()):
        gen = getattr(o, "generated_tokens", [])
        tokens += min(len(gen), work[i][1] if i < len(work) else len(gen))
        stamps = getattr(o, "timestamps", None)
        created = getattr(o, "created_time", None)
        if stamps and created is not None:
            ttft.append(stamps[0] - created)
    if tokens == 0:
        raise RuntimeError("generate_batch produced no tokens")
    return dict(wall_s=wall, tokens=tokens, requests=len(out), ttft=ttft, compile_s=0.0,
                device=torch.cuda.get_device_name() if dev == "cuda" else "cpu")


# ------------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------------

def summarise(res: dict) -> dict:
    if "error" in res:
        return res
    wall = res["wall_s"]
    out = dict(res, tok_s=res["tokens"] / wall, req_s=res["requests"] / wall,
               ttft_p50=percentile(res["ttft"], 50), ttft_p99=percentile(res["ttft"], 99),
               compile_share=res.get("compile_s", 0.0) / wall)
    out.pop("ttft")
    return out


def table(results: dict) -> str:
    head = ("| model / workload | implementation | wall s | output tok/s | req/s | TTFT p50 s | TTFT p99 s | "
            "compile share | decode ms/step | % HBM roofline |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: "
            "| ---: | ---: |")
    rows = [head]
    for key, impls in results.items():
        base = impls.get("static", {}).get("tok_s")
        for impl, r in impls.items():
            if "error" in r:
                rows.append(f"| {key} | {impl} | failed: {r['error'][:80]} | | | | | | | |")
                continue
            speed = f" ({r['tok_s'] / base:.2f}x static)" if base and impl != "static" else ""
            step = r.get("decode_step_s")
            roof = r.get("roofline")
            rows.append(f"| {key} | {impl} | {r['wall_s']:.1f} | {r['tok_s']:.0f}{speed} | {r['req_s']:.2f} | "
                        f"{fmt(r['ttft_p50'], '.2f')} | {fmt(r['ttft_p99'], '.2f')} | {r['compile_share']:.1%} | "
                        f"{fmt(None if step is None else step * 1e3, '.2f')} | "
                        f"{fmt(None if roof is None else roof * 100, '.0f')} |")
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="stablelm-3b,deepseek-v2-lite")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--new", type=int, default=128, help="new tokens per request")
    p.add_argument("--mixed", action="store_true", help="also the mixed-output-length workload")
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--batch", type=int, default=64, help="static batch size")
    p.add_argument("--cache-len", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="stablelm-3b, 64 requests, 64 new tokens")
    p.add_argument("--tiny", action="store_true", help="tiny random models on any device (also BENCH_SMOKE=1)")
    p.add_argument("--out", default=None, help="write results.json and table.md here")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workload", default="fixed", help=argparse.SUPPRESS)
    args = p.parse_args()
    if os.environ.get("BENCH_SMOKE") == "1":
        args.tiny = True
    if args.worker:
        lo, hi, mean = (4, 96, 24.0) if args.models.startswith("tiny") else (16, 1536, 300.0)
        vocab = model_config(args.models)["vocab_size"]
        work = workload(args.requests, args.new, args.workload == "mixed", vocab, lo, hi, mean)
        res = globals()[f"worker_{args.worker}"](args, work)
        print("RESULT " + json.dumps(res), flush=True)
        return
    if args.quick:
        args.models, args.requests, args.new = "stablelm-3b", 64, 64
    if args.tiny:
        args.models = "tiny,tiny-v2"
        args.requests, args.new, args.slots, args.batch = min(args.requests, 24), min(args.new, 8), 8, 8
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    results = {}
    for name in args.models.split(","):
        for wl in ["fixed"] + (["mixed"] if args.mixed else []):
            key = f"{name} {wl} ({args.requests} req, {args.new} new)" if wl == "fixed" else f"{name} mixed"
            results[key] = {}
            for impl in args.impls.split(","):
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--models", name, "--workload", wl,
                       "--requests", str(args.requests), "--new", str(args.new), "--slots", str(args.slots),
                       "--batch", str(args.batch)]
                if args.cache_len:
                    cmd += ["--cache-len", str(args.cache_len)]
                env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.92", "PYTHONPATH": ROOT}
                t = time.perf_counter()
                res = run_worker(cmd, f"{impl}_{name}_{wl}", timeout=args.timeout, out=args.out, env=env, echo=True)
                results[key][impl] = summarise(res)
                print(f"-- {key} {impl}: {time.perf_counter() - t:.0f}s "
                      f"{results[key][impl].get('tok_s', results[key][impl].get('error'))}", flush=True)
    text = (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
            f"`python benchmarks/bench_batch.py {' '.join(sys.argv[1:])}`\n\n" + table(results))
    print(text)
    save_results(args.out, results, text)


if __name__ == "__main__":
    main()
