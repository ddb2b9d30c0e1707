"""Expert parallelism on 2 GPUs vs 1 GPU: deepseek-v2-lite shape, bf16, random weights.

Each configuration runs in its own subprocess (so GPU memory and peak statistics are its own):
  1gpu      no mesh, all 64 experts on one GPU (the single-device code path)
  2gpu-ep   make_mesh(expert=2): 32 experts per GPU; dense weights replicated; the batch is split over
            `expert` outside the MoE blocks and all-gathered / reduce-scattered around them
  2gpu-ep-replicated  the same with rules {"batch": ("data", "fsdp")}: both GPUs run attention on the
            whole batch and the MoE only psums its partial outputs
Measured: forward (prefill) tokens/s for 8x512 tokens, decode tokens/s at batch 1, 8, 32 (prompt 128;
a step is (t(N new) - t(1 new)) / (N - 1) with one compiled program), and per-device memory
(bytes in use after the weights are created, peak over the run). Results stream to stdout and to
--out/bench_sharding_<config>.json as they are measured, so a run cut short still reports.

  python benchmarks/bench_sharding.py --out /tmp/res                      # both configurations
  BENCH_SMOKE=1 XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/bench_sharding.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

V2_LITE = dict(
    vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
    num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
    first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128,
    v_head_dim=128, topk_method="greedy", max_position_embeddings=163840)
PREFILL = (8, 512)
DECODE_BATCHES = (1, 8, 32)
PROMPT, NEW, REPS = 128, 33, 2
if os.environ.get("BENCH_SMOKE"):  # a CPU run of the script itself: tiny shapes, same code paths
    V2_LITE.update(vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32,
                   qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)
    PREFILL, DECODE_BATCHES, PROMPT, NEW, REPS = (2, 32), (1, 4), 16, 5, 2

# name -> (mesh axes, rules overrides); the 2-GPU runs first: they are the point.
CONFIGS = {"2gpu-ep": (dict(expert=2), None),
           "2gpu-ep-replicated": (dict(expert=2), {"batch": ("data", "fsdp")}),  # tokens on both GPUs, psum only
           "1gpu": (None, None)}


def median(xs):
    return sorted(xs)[len(xs) // 2]


def memory(devices) -> list[dict]:
    out = []
    for d in devices:
        stats = d.memory_stats() or {}
        out.append({"in_use_gib": stats.get("bytes_in_use", 0) / 2**30,
                    "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30})
    return out


def random_model(cfg, mesh, dtype, rules=None):
    """Random weights (std 0.02, norms 1) created leaf by leaf directly with their final shardings."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxmodels import sharding
    from jaxmodels.model import abstract_model

    graphdef, abstract = nnx.split(abstract_model(cfg, dtype))
    key = jax.random.key(0)
    leaves = []
    for i, (path, var) in enumerate(nnx.to_flat_state(abstract)):
        out = sharding.param_sharding(var, mesh, rules) if mesh is not None else None
        shape, dt = var.shape, var.dtype
        if "norm" in str(path[-2]) or str(path[-1]) == "e_score_correction_bias":
            f = jax.jit(lambda k, shape=shape, dt=dt: jnp.ones(shape, dt), out_shardings=out)
        else:
            f = jax.jit(lambda k, shape=shape, dt=dt: (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dt),
                        out_shardings=out)
        leaves.append((path, var.replace(value=f(jax.random.fold_in(key, i)))))
    model = nnx.merge(graphdef, nnx.from_flat_state(leaves))
    if mesh is not None:
        model = model.with_options(mesh=mesh, **({} if rules is None else {"rules": rules}))
    return model


def worker(name: str, out_dir: str | None) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import jaxmodels
    from jaxmodels import sharding
    from jaxmodels.config import DeepseekV2Config

    res = {"config": name, "devices": [], "jax": jax.__version__}
    path = os.path.join(out_dir, f"bench_sharding_{name}.json") if out_dir else None

    def save():
        print("RESULT " + json.dumps(res), flush=True)
        if path:
            with open(path, "w") as f:
                json.dump(res, f, indent=1)

    cfg = DeepseekV2Config(**V2_LITE)
    axes, rules = CONFIGS[name]
    devices = jax.devices()[: (2 if axes else 1)]
    res["devices"] = [d.device_kind for d in devices]
    mesh = sharding.make_mesh(**axes, devices=devices) if axes else None
    t = time.perf_counter()
    model = random_model(cfg, mesh, jnp.bfloat16, rules)
    jax.block_until_ready(nnx.state(model))
    res["init_s"] = time.perf_counter() - t
    res["weights_memory"] = memory(devices)
    gate = model.model.moe_layers.layers.mlp.experts.gate_up_proj.get_value()
    res["experts_per_device"] = int(gate.addressable_shards[0].data.shape[1])
    save()

    def put(a):
        return sharding.shard_batch(a, mesh, rules) if mesh is not None else jnp.asarray(a)

    rng = np.random.default_rng(0)
    b, p = PREFILL
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids).logits[:, -1])
    ids = put(rng.integers(10, cfg.vocab_size, (b, p)).astype(np.int32))
    t = time.perf_counter()
    last = np.asarray(fwd(state, ids), np.float32)  # [b, vocab] at the last position
    res["forward_compile_s"] = time.perf_counter() - t
    # Same weights in every configuration (threefry is partitionable): the argmaxes should agree.
    res["forward_argmax"] = last.argmax(-1).tolist()
    res["forward_abs_mean"] = float(np.abs(last).mean())
    ts = []
    for _ in range(REPS):
        t = time.perf_counter()
        jax.block_until_ready(fwd(state, ids))
        ts.append(time.perf_counter() - t)
    res[f"forward_{b}x{p}_tok_s"] = b * p / median(ts)
    print(f"[{name}] forward {b}x{p}: {b * p / median(ts):.0f} tok/s", flush=True)
    save()

    res["decode"] = {}
    for bs in DECODE_BATCHES:
        prompt = rng.integers(10, cfg.vocab_size, (bs, PROMPT)).astype(np.int32)
        ids, mask = put(prompt), put(np.ones_like(prompt))

        def gen(n):
            t = time.perf_counter()
            jaxmodels.generate(model, ids, mask, max_new_tokens=n, eos_token_id=-1)
            return time.perf_counter() - t

        gen(NEW)  # compile (max_new_tokens is traced: one program for both lengths)
        t_full = median([gen(NEW) for _ in range(REPS)])
        t_one = median([gen(1) for _ in range(REPS)])
        step = (t_full - t_one) / (NEW - 1)
        res["decode"][str(bs)] = {"ms_per_step": step * 1e3, "tok_s": bs / step}
        print(f"[{name}] decode b{bs}: {step * 1e3:.2f} ms/step, {bs / step:.0f} tok/s", flush=True)
        res["peak_memory"] = memory(devices)
        save()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", default=None, help="directory for the JSON results")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.out)
        return 0
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results = {}
    for name in args.configs:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name] + (["--out", args.out] if args.out else [])
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            if line.startswith("RESULT "):
                results[name] = json.loads(line[len("RESULT "):])
            elif "Warning" not in line and "warn(" not in line:
                print(line.rstrip("\n"), flush=True)
        proc.wait()
        print(f"-- {name}: rc {proc.returncode}, {time.perf_counter() - t:.0f}s", flush=True)
    print(table(results))
    ref = results.get("1gpu", {}).get("forward_argmax")
    for name, r in results.items():
        if ref and name != "1gpu" and r.get("forward_argmax"):
            a = r["forward_argmax"]
            print(f"forward argmax agreement {name} vs 1gpu: {sum(x == y for x, y in zip(a, ref))}/{len(ref)}")
    return 0


def table(results: dict) -> str:
    b, p = PREFILL
    rows = [f"| configuration | experts/GPU | forward {b}x{p} tok/s | "
            + " | ".join(f"decode b{bs} tok/s" for bs in DECODE_BATCHES)
            + " | weights GiB/GPU | peak GiB/GPU |",
            "| --- | ---: | ---: | " + " | ".join("---:" for _ in DECODE_BATCHES) + " | ---: | ---: |"]
    for name, r in results.items():
        dec = r.get("decode", {})
        cells = [f"{dec[str(bs)]['tok_s']:.0f}" if str(bs) in dec else "-" for bs in DECODE_BATCHES]
        w = "/".join(f"{m['in_use_gib']:.1f}" for m in r.get("weights_memory", []))
        pk = "/".join(f"{m['peak_gib']:.1f}" for m in r.get("peak_memory", []))
        fw = r.get(f"forward_{b}x{p}_tok_s")
        rows.append(f"| {name} | {r.get('experts_per_device', '-')} | {fw:.0f} | " if fw else
                    f"| {name} | {r.get('experts_per_device', '-')} | - | ")
        rows[-1] += " | ".join(cells) + f" | {w or '-'} | {pk or '-'} |"
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
