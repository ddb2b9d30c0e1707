"""Prefill/training attention on one GPU: cuDNN variants against the XLA einsum path, numerics and speed.

`jaxmodels.layers.attention.dot_product_attention` picks the kernel; this script runs every variant at
the models' real shapes, checks it against XLA in float32 (same bf16 inputs) and times forward and
forward+backward (`jax.block_until_ready`, warm-ups, median of reps). Variants:

  xla              einsums + float32 masked softmax over the dense mask (the reference)
  cudnn            dense mask as cuDNN's additive bias, no causal hint
  cudnn+seg        the segment mask as a bias plus cuDNN's causal mask (skips blocks above the diagonal): what
                   dot_product_attention's "cudnn" does (it reads the forward inputs' segment ids)
  cudnn_packed     cuDNN's packed layout from segment ids (runs -> offsets/lengths), no bias, M = seq
  cudnn_packed_m8  the same with at most 8 runs per row (M = 8): what a bounded M would cost/gain

Shapes (bf16): StableLM 1x2048 and 8x1024, 32 heads d=80 (causal, row 0 unpadded / others left-padded);
V2-Lite MLA 1x2048 16 heads qk 192 / v 128; V3 MLA 1x2048 128 heads 192/128; packed 8x1024 32 heads d=80
with ~4 documents per row and a little trailing padding.

TFLOP/s count useful FLOPs only: 2 * (allowed query-key pairs) * heads * (dq + dv) forward, 3.5x that
for forward+backward. Errors are relative L2 norms against XLA in float32, on non-padding queries only.

  python benchmarks/bench_attention.py --out /tmp/bench     # prints the table, writes attention.md/.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {  # name: (batch, seq, heads, kv_heads, dq, dv, packed)
    "stablelm_1x2048": (1, 2048, 32, 32, 80, 80, False),
    "stablelm_8x1024": (8, 1024, 32, 32, 80, 80, False),
    "v2lite_mla_1x2048": (1, 2048, 16, 16, 192, 128, False),
    "v3_mla_1x2048": (1, 2048, 128, 128, 192, 128, False),
    "packed_8x1024": (8, 1024, 32, 32, 80, 80, True),
}
VARIANTS = ["xla", "cudnn", "cudnn+seg", "cudnn_packed", "cudnn_packed_m8"]


def make_case(name):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxmodels.layers.attention import segment_mask

    b, s, h, kvh, dq, dv, packed = SHAPES[name]
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (b, s, h, dq), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, s, kvh, dq), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, s, kvh, dv), jnp.bfloat16)
    w = jax.random.normal(ks[3], (b, s, h, dv), jnp.float32)
    rng = np.random.default_rng(0)
    seg = np.ones((b, s), np.int32)
    if packed:
        for i in range(b):
            cuts = np.sort(rng.choice(np.arange(64, s - 64), size=3, replace=False))
            bounds = [0, *cuts, s - int(rng.integers(0, 32))]
            seg[i] = 0
            for d in range(4):
                seg[i, bounds[d]:bounds[d + 1]] = d + 1
    else:
        for i in range(1, b):  # left padding: the generate-time prefill layout
            seg[i, :int(rng.integers(1, s // 8))] = 0
    seg = jnp.asarray(seg)
    mask = segment_mask(seg) if packed else _causal(seg)
    return q, k, v, w, seg, mask


def _causal(am):
    from jaxmodels.layers.attention import causal_mask
    return causal_mask(am, am.shape[0], am.shape[1])


def variant_fn(variant, mask, seg, scale):
    from jaxmodels.layers import attention as A

    if variant == "cudnn_packed_m8":
        return lambda q, k, v: A._cudnn_packed_attention(q, k, v, seg, scale, max_segments=8)
    if variant == "cudnn":  # the dense bias alone (no causal hint)
        return lambda q, k, v: A._cudnn_attention(q, k, v, mask, scale, causal=False)
    import jax.numpy as jnp

    from jaxmodels.inputs import Inputs
    impl = {"cudnn+seg": "cudnn"}.get(variant, variant)
    inputs = Inputs(positions=jnp.broadcast_to(jnp.arange(seg.shape[1], dtype=jnp.int32), seg.shape), segment_ids=seg)
    return lambda q, k, v: A.dot_product_attention(q, k, v, inputs, scale=scale, implementation=impl)


def timed(fn, args, reps):
    import jax

    jax.block_until_ready(fn(*args))  # compile
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def rel(a, b, real):
    import numpy as np
    a = np.where(real, np.asarray(a, np.float32), 0)
    b = np.where(real, np.asarray(b, np.float32), 0)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run_shape(name, reps):
    import jax
    import jax.numpy as jnp
    import numpy as np

    b, s, h, kvh, dq, dv, packed = SHAPES[name]
    q, k, v, w, seg, mask = make_case(name)
    scale = dq ** -0.5
    real_q = (np.asarray(seg) != 0)[:, :, None, None]  # padding queries: any finite value is fine
    pairs = float(np.asarray(mask).sum())
    fwd_flops = 2.0 * pairs * h * (dq + dv)

    def fwd_bwd(fn):
        def loss(q, k, v):
            out = fn(q, k, v)
            return jnp.sum(jnp.where(real_q, out.astype(jnp.float32) * w, 0.0))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    ref_fn = variant_fn("xla", mask, seg, scale)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref_out = jax.jit(ref_fn)(*f32)
    ref_grads = fwd_bwd(ref_fn)(*f32)
    rows = []
    for variant in VARIANTS:
        row = dict(shape=name, variant=variant)
        try:
            fn = variant_fn(variant, mask, seg, scale)
            out = jax.jit(fn)(q, k, v)
            grads = fwd_bwd(fn)(q, k, v)
            finite = bool(np.isfinite(np.asarray(out, np.float32)).all()
                          and all(np.isfinite(np.asarray(g, np.float32)).all() for g in grads))
            row["finite"] = finite
            row["err_out"] = rel(out, ref_out, real_q)
            # dq only on real queries; dk/dv: padding keys get no attention from real queries
            row["err_grad"] = max(rel(grads[0], ref_grads[0], real_q),
                                  *(rel(g, r, True) for g, r in zip(grads[1:], ref_grads[1:])))
            row["fwd_ms"] = timed(jax.jit(fn), (q, k, v), reps)
            row["fwd_bwd_ms"] = timed(fwd_bwd(fn), (q, k, v), reps)
            row["fwd_tflops"] = fwd_flops / row["fwd_ms"] / 1e9
            row["fwd_bwd_tflops"] = 3.5 * fwd_flops / row["fwd_bwd_ms"] / 1e9
        except Exception as e:  # a variant this GPU/jax cannot run: say why, go on
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows, header):
    lines = [header, "",
             "| shape | variant | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | err out | err grad | finite |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['variant']} | — | — | — | — | — | — | {r['error']} |")
            continue
        lines.append(f"| {r['shape']} | {r['variant']} | {r['fwd_ms']:.3f} | {r['fwd_tflops']:.1f} | "
                     f"{r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_tflops']:.1f} | {r['err_out']:.2e} | "
                     f"{r['err_grad']:.2e} | {r['finite']} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/out", help="directory for attention.md and attention.json")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()

    import jax

    from jaxmodels.layers.attention import _cuda_facts, choose_implementation

    dev = jax.devices()[0]
    facts = _cuda_facts()
    header = (f"# Attention kernels — {dev.device_kind}, jax {jax.__version__}, "
              f"cuDNN {facts[1] if facts else 'n/a'}, compute capability {facts[0] if facts else 'n/a'}")
    print(header, flush=True)
    rows = []
    for name in args.shapes:
        q, k, v, *_ = make_case(name)
        print(f"{name}: auto picks {choose_implementation(q, k, v, None)!r} without segment ids", flush=True)
        rows += run_shape(name, args.reps)
    md = table(rows, header)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "attention.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "attention.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
