"""Grouped matmul (the MoE prefill kernel) on one GPU: which implementation to use at which expert count.

`jaxmodels.layers.moe.grouped_matmul` multiplies token rows sorted by expert with their expert's weights.
This script times the candidates at the real MoE shapes, each in its own subprocess (XLA flags are read at
start-up, and a compile that never ends is cut by a timeout):

  mgpu        Pallas Mosaic-GPU ragged_dot (Hopper), `jax.experimental.pallas.ops.gpu.ragged_dot_mgpu`,
              blocks of 128 rows (what the model uses); mgpu-m64: blocks of 64 rows
  xla         jax.lax.ragged_dot with XLA's default GPU lowering
  xla-cudnn   jax.lax.ragged_dot with XLA_FLAGS=--xla_gpu_experimental_use_ragged_dot_fusion=true
  dense       one plain [rows, in] x [in, out] matmul of the same FLOPs (the speed to aim for)

Shapes (rows = tokens * top-k of a 1x2048 prefill, routed uniformly at random):
  v2-lite  64 experts, hidden 2048, moe_intermediate 1408, top-6
  v3       256 experts, hidden 7168, moe_intermediate 2048, top-8

  python benchmarks/bench_grouped_matmul.py            # prints a table (compile s, ms, TFLOP/s, max err)

--backward times forward + backward (the VJP to lhs and rhs, what a training step runs) through
`jaxmodels.layers.moe.grouped_matmul` itself, counting 3x the forward FLOPs:

  mgpu           impl="auto": the custom VJP, Mosaic forward, d_lhs (the forward kernel, transpose_rhs) and
                 d_rhs (jax's transposed ragged-dot kernel)
  mgpu-xla-drhs  impl="auto-xla-drhs": the same with d_rhs by XLA's ragged_dot_general
  xla            impl="xla": jax.lax.ragged_dot and its VJP; xla-cudnn: with the ragged-dot fusion flag
  dense          a plain matmul's forward + backward of the same FLOPs

  python benchmarks/bench_grouped_matmul.py --backward

--sweep times the Mosaic-GPU forward kernel over a grid of tile sizes (SWEEP) at each shape, in one process,
and prints them fastest first (what `jaxmodels.layers.moe` ships is marked):

  python benchmarks/bench_grouped_matmul.py --sweep --shapes v3,v3-down
  python benchmarks/bench_grouped_matmul.py --sweep --shapes v3 --grid max_concurrent_steps=4,5 --grid grid_block_n=8,16
  python benchmarks/bench_grouped_matmul.py --sweep --shapes v3-gate-up,v3-down --grid block_m=64,128,192 --grid grid_block_n=1,8

The kernel's grid is static: cdiv(rows, block_m) + experts - 1 row tiles, each a full pass over the contraction
that reads its expert's weight columns, whether the tile holds 1 row of the expert or block_m. At 64 rows per
expert (V3 prefill 1x2048) smaller tiles therefore read the weights more often (block_m 64: 511 row tiles, 128:
383, 192: 340; 256 experts at least), which is why block_m 64 measured slower.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

SHAPES = {  # name: (experts, in, out, top_k, tokens): gate/up projections, and the down projection (-down)
    "v2-lite": (64, 2048, 1408, 6, 2048),
    "v3": (256, 7168, 2048, 8, 2048),
    "v2-lite-down": (64, 1408, 2048, 6, 2048),
    "v3-down": (256, 2048, 7168, 8, 2048),
    # gate and up fused into one product (Experts.gate_up_proj; the model runs it with transpose_rhs)
    "v2-lite-gate-up": (64, 2048, 2816, 6, 2048),
    "v3-gate-up": (256, 7168, 4096, 8, 2048),
}
# --sweep: the Mosaic-GPU forward kernel's tiles, all in one process (no XLA flags involved), fastest first.
SWEEP = dict(block_m=(128,), block_n=(128, 256), block_k=(64, 128), max_concurrent_steps=(2, 4),
             grid_block_n=(1, 8))
VARIANTS = ["dense", "mgpu", "mgpu-m64", "xla", "xla-cudnn"]
BWD_VARIANTS = ["dense", "mgpu", "mgpu-xla-drhs", "xla", "xla-cudnn"]


def inputs(shape: str):
    """(rows, group sizes (numpy), key, lhs [rows, hidden] bf16, rhs [experts, hidden, inter] bf16): uniform
    random routing of `tokens` x top-k slots."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    e, hidden, inter, k, tokens = SHAPES[shape]
    m = tokens * k
    rng = np.random.default_rng(0)
    sizes = np.bincount(rng.integers(0, e, m), minlength=e).astype(np.int32)
    key = jax.random.key(0)
    lhs = (jax.random.normal(key, (m, hidden), jnp.float32) * 0.1).astype(jnp.bfloat16)
    rhs = (jax.random.normal(jax.random.fold_in(key, 1), (e, hidden, inter), jnp.float32) * 0.02).astype(jnp.bfloat16)
    return m, sizes, key, lhs, rhs


def worker(variant: str, shape: str, reps: int, backward: bool = False) -> dict:
    if backward:
        return backward_worker(variant, shape, reps)
    import jax
    import jax.numpy as jnp
    import numpy as np

    e, hidden, inter, k, tokens = SHAPES[shape]
    m, sizes, key, lhs, rhs = inputs(shape)
    gs = jnp.asarray(sizes)
    if variant == "dense":
        fn = jax.jit(lambda a, b, g: a @ b[0])
    elif variant.startswith("mgpu"):
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
        bm = 64 if variant == "mgpu-m64" else 128
        fn = jax.jit(lambda a, b, g: ragged_dot_mgpu.ragged_dot(a, b, group_sizes=g, block_m=bm, block_n=128,
                                                                 block_k=64, max_concurrent_steps=4, grid_block_n=1))
    else:
        fn = jax.jit(lambda a, b, g: jax.lax.ragged_dot(a, b, g))
    t = time.perf_counter()
    compiled = fn.lower(lhs, rhs, gs).compile()
    compile_s = time.perf_counter() - t
    hlo = compiled.as_text()
    out = compiled(lhs, rhs, gs)
    out.block_until_ready()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        compiled(lhs, rhs, gs).block_until_ready()
        ts.append(time.perf_counter() - t)
    sec = sorted(ts)[len(ts) // 2]
    err = None
    if variant != "dense":  # check 4 groups against a float32 reference
        starts = np.concatenate([[0], np.cumsum(sizes)])
        o = np.asarray(out.astype(jnp.float32))
        a, b = np.asarray(lhs.astype(jnp.float32)), np.asarray(rhs.astype(jnp.float32))
        err = 0.0
        for g in (0, 1, e // 2, e - 1):
            ref = a[starts[g]:starts[g + 1]] @ b[g]
            got = o[starts[g]:starts[g + 1]]
            err = max(err, float(np.abs(got - ref).max() / (np.abs(ref).max() + 1e-9)))
    kinds = sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)))
    return dict(compile_s=compile_s, ms=sec * 1e3, tflops=2 * m * hidden * inter / sec / 1e12, err=err,
                custom_calls=kinds[:6], device=jax.devices()[0].device_kind)


def sweep_worker(shape: str, reps: int, budget_s: float) -> dict:
    """Every SWEEP tile config of the Mosaic-GPU forward at one shape (skipping those that do not fit shared
    memory or do not divide the shape), until budget_s seconds have passed."""
    import itertools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from jaxmodels.layers import moe

    e, hidden, inter, k, tokens = SHAPES[shape]
    m, sizes, key, lhs, rhs = inputs(shape)
    gs = jnp.asarray(sizes)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    a, b = np.asarray(lhs[: starts[2]].astype(jnp.float32)), np.asarray(rhs[:2].astype(jnp.float32))
    shipped = moe._forward_tiles(inter)
    rows, t_start = [], time.perf_counter()
    for combo in itertools.product(*SWEEP.values()):
        kw = dict(zip(SWEEP, combo))
        if inter % (kw["block_n"] * kw["grid_block_n"]) or hidden % kw["block_k"]:
            continue
        if time.perf_counter() - t_start > budget_s:
            rows.append(dict(kw, ms=None, note="budget"))
            continue
        fn = jax.jit(lambda x, w, g, kw=kw: ragged_dot_mgpu.ragged_dot(x, w, group_sizes=g, **kw))
        try:
            compiled = fn.lower(lhs, rhs, gs).compile()
            out = compiled(lhs, rhs, gs)
            out.block_until_ready()
        except Exception as err:  # shared memory exceeded, unsupported tiles
            rows.append(dict(kw, ms=None, note=str(err).splitlines()[0][:80]))
            continue
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            compiled(lhs, rhs, gs).block_until_ready()
            ts.append(time.perf_counter() - t)
        o = np.asarray(out[: starts[2]].astype(jnp.float32))
        ref = np.concatenate([a[: starts[1]] @ b[0], a[starts[1]:] @ b[1]])
        err = float(np.abs(o - ref).max() / (np.abs(ref).max() + 1e-9))
        sec = sorted(ts)[len(ts) // 2]
        rows.append(dict(kw, ms=sec * 1e3, tflops=2 * m * hidden * inter / sec / 1e12, err=err,
                         shipped=kw == shipped))
    return dict(rows=rows, device=jax.devices()[0].device_kind)


def backward_worker(variant: str, shape: str, reps: int) -> dict:
    """Forward + backward of grouped_matmul (the model's function) at one shape; see --backward."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from jaxmodels.layers import moe

    e, hidden, inter, k, tokens = SHAPES[shape]
    m, sizes, key, lhs, rhs = inputs(shape)
    cot = (jax.random.normal(jax.random.fold_in(key, 2), (m, inter), jnp.float32) * 0.1).astype(jnp.bfloat16)
    gs = jnp.asarray(sizes)
    if variant == "dense":
        gmm = lambda a, b, g: a @ b[0]  # noqa: E731
    else:
        impl = {"mgpu": "auto", "mgpu-xla-drhs": "auto-xla-drhs"}.get(variant, "xla")
        gmm = lambda a, b, g: moe.grouped_matmul(a, b, g, impl=impl)  # noqa: E731
        kernels = moe._mosaic_gpu_ok(lhs, rhs, impl)
        if variant.startswith("mgpu") and kernels != (True, True, impl == "auto"):
            raise RuntimeError(f"grouped_matmul(impl={impl!r}) would not use the Mosaic kernels here: {kernels}")

    def fwd_bwd(a, b, g, c):
        out, vjp = jax.vjp(lambda a, b: gmm(a, b, g), a, b)
        return vjp(c)  # (d_lhs [m, hidden], d_rhs [e, hidden, inter]); the forward runs as well

    fn = jax.jit(fwd_bwd)
    t = time.perf_counter()
    compiled = fn.lower(lhs, rhs, gs, cot).compile()
    compile_s = time.perf_counter() - t
    hlo = compiled.as_text()
    d_lhs, d_rhs = compiled(lhs, rhs, gs, cot)
    d_rhs.block_until_ready()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(compiled(lhs, rhs, gs, cot))
        ts.append(time.perf_counter() - t)
    sec = sorted(ts)[len(ts) // 2]
    err = None
    if variant != "dense":  # check both gradients of 4 groups against a float32 reference
        starts = np.concatenate([[0], np.cumsum(sizes)])
        a, b, c = (np.asarray(x.astype(jnp.float32)) for x in (lhs, rhs, cot))
        dl, dr = np.asarray(d_lhs.astype(jnp.float32)), np.asarray(d_rhs.astype(jnp.float32))
        err = 0.0
        for g in (0, 1, e // 2, e - 1):
            rows = slice(starts[g], starts[g + 1])
            for got, ref in ((dl[rows], c[rows] @ b[g].T), (dr[g], a[rows].T @ c[rows])):
                err = max(err, float(np.abs(got - ref).max() / (np.abs(ref).max() + 1e-9)))
    kinds = sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)))
    return dict(compile_s=compile_s, ms=sec * 1e3, tflops=3 * 2 * m * hidden * inter / sec / 1e12, err=err,
                custom_calls=kinds[:6], device=jax.devices()[0].device_kind)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--variants", help=f"default: {','.join(VARIANTS)}; with --backward {','.join(BWD_VARIANTS)}")
    ap.add_argument("--backward", action="store_true", help="time forward + backward (3x the forward FLOPs)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--timeout", type=int, default=150, help="seconds per variant (compile included)")
    ap.add_argument("--sweep", action="store_true", help="time the Mosaic-GPU kernel over a grid of tile sizes")
    ap.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2",
                    help="--sweep: replace one axis of the tile grid, e.g. --grid grid_block_n=8,16 (repeatable)")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    for item in args.grid:
        name, _, values = item.partition("=")
        if name not in SWEEP or not values:
            ap.error(f"--grid {item!r}: expected NAME=V1,V2 with NAME one of {list(SWEEP)}")
        SWEEP[name] = tuple(int(v) for v in values.split(","))
    if args.worker:
        if args.sweep:
            res = sweep_worker(args.worker[1], args.reps, args.timeout - 30)
        else:
            res = worker(args.worker[0], args.worker[1], args.reps, args.backward)
        print("RESULT " + json.dumps(res), flush=True)
        return
    if args.sweep:
        return sweep(args)
    variants = args.variants or ",".join(BWD_VARIANTS if args.backward else VARIANTS)
    what = "fwd+bwd " if args.backward else ""
    rows = [f"| shape | variant | compile s | {what}ms | {what}TFLOP/s | max rel err | custom calls |",
            "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for shape in args.shapes.split(","):
        for variant in variants.split(","):
            env = dict(os.environ)
            if variant == "xla-cudnn":
                env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_experimental_use_ragged_dot_fusion=true").strip()
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, shape, "--reps", str(args.reps)]
            cmd += ["--backward"] if args.backward else []
            t = time.perf_counter()
            try:
                p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
                lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                if lines:
                    r = json.loads(lines[-1][7:])
                    err = "-" if r["err"] is None else f"{r['err']:.1e}"
                    rows.append(f"| {shape} | {variant} | {r['compile_s']:.1f} | {r['ms']:.3f} | {r['tflops']:.0f} | "
                                f"{err} | {' '.join(r['custom_calls'])} |")
                else:
                    errs = [ln for ln in p.stderr.splitlines() if "Error" in ln] or p.stderr.splitlines() or ["?"]
                    tail = errs[-1].strip()[:160]
                    rows.append(f"| {shape} | {variant} | failed (rc {p.returncode}): {tail} | | | | |")
            except subprocess.TimeoutExpired:
                rows.append(f"| {shape} | {variant} | timed out after {time.perf_counter() - t:.0f} s | | | | |")
            print(rows[-1], flush=True)
    print("\n".join(rows))


def sweep(args):
    out = []
    for shape in args.shapes.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "sweep", shape, "--sweep", "--reps",
               str(args.reps), "--timeout", str(args.timeout)] + [f"--grid={g}" for g in args.grid]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout + 60)
        except subprocess.TimeoutExpired:
            out.append(f"{shape}: timed out")
            continue
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if not lines:
            out.append(f"{shape}: failed (rc {p.returncode}): {(p.stderr.strip().splitlines() or ['?'])[-1][:200]}")
            continue
        rows = json.loads(lines[-1][7:])["rows"]
        e, hidden, inter, k, tokens = SHAPES[shape]
        out += ["", f"{shape}: {e} experts, [{tokens * k}, {hidden}] x [{hidden}, {inter}] per expert",
                "| block_m | block_n | block_k | steps | grid_block_n | ms | TFLOP/s | max rel err |",
                "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in sorted(rows, key=lambda r: (r["ms"] is None, r["ms"] or 0)):
            cells = f"| {r['block_m']} | {r['block_n']} | {r['block_k']} | {r['max_concurrent_steps']} | {r['grid_block_n']} |"
            if r["ms"] is None:
                out.append(f"{cells} {r['note']} | | |")
            else:
                mark = " (shipped)" if r["shipped"] else ""
                out.append(f"{cells} {r['ms']:.3f}{mark} | {r['tflops']:.0f} | {r['err']:.1e} |")
        print("\n".join(out[-len(rows) - 4:]), flush=True)
    print("\n".join(out))


if __name__ == "__main__":
    main()
