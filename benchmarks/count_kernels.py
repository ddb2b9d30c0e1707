"""Kernels per decode step on a GPU, counted on any machine: XLA compiles for a compile-only CUDA device.

A batch-1 decode step of a dense model is ~half weight reads near HBM bandwidth and ~half small kernels
(norms, rope, cache writes, softmax) whose launches and tails add up (benchmarks/RESULTS.md): the number of
kernels per layer is the lever, and XLA decides it at compile time. jax can compile for a GPU it does not
have (a "topology" of compile-only devices described by a target config), so this runs on a CPU machine:
it compiles `jaxmodels.generate`'s decode step (or its prefill; weights abstract, nothing allocated) with
generate's own compiler options for an H100 or H200, reads the optimised HLO and counts what launches work on
the device (fusions, library calls, copies; not parameters, tuples, bitcasts or loop control), inside each
layer loop and outside. What it does not tell: how long each kernel takes; that needs the GPU (bench_generate.py).

Needs jax's CUDA plugin of the installed jax's version, without CUDA libraries or a GPU:
  pip install "jax-cuda12-plugin==$V" "jax-cuda12-pjrt==$V"      # V = python -c 'import jax; print(jax.__version__)'
  python benchmarks/count_kernels.py                                # every model, decode at batch 1 and 32
  python benchmarks/count_kernels.py --models stablelm-3b --batches 1 --list   # + each layer's kernels
  python benchmarks/count_kernels.py --batches "" --prefill 1x2048  # the prefill programs
  python benchmarks/count_kernels.py --train stablelm-3b/8x1024 --remats save_matmuls,lean,full --list-copies
        # bench_train's training step (float32 master weights + AdamW, bf16 compute, cuDNN attention): kernels,
        # copies/transposes, and the compiled memory (temp = activations, residuals, workspaces) per remat policy
The counts come from the installed jax's XLA (the GPU machine may run a newer one).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

# The compile-only GPU targets: jaxmodels.pods.GPU_TARGETS (imported late: jax must not load before main() sets
# JAX_PLATFORMS).
TARGETS = ("h100", "h200")


# HLO instructions that launch nothing on the device (loops, branches and calls are walked into instead).
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "add-dependency",
         "opt-barrier", "partition-id", "replica-id"}


def target_config(target: str) -> str:
    """The GpuTargetConfigProto (text format) XLA's GPU backend compiles for: jaxmodels.pods.gpu_target_config."""
    from jaxmodels.pods import gpu_target_config

    return gpu_target_config(target)


# ------------------------------------------------------------------------------------------- HLO reading


def computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    """({computation name: its instruction lines}, the entry computation's name) of an HLO module's text."""
    comps, entry, cur = {}, None, None
    for line in hlo.splitlines():
        m = re.match(r"^(ENTRY )?%?([\w.\-]+) \(.*\{\s*$", line)
        if m:
            cur = m.group(2)
            comps[cur] = []
            entry = cur if m.group(1) else entry
        elif line.startswith("}"):
            cur = None
        elif cur and line.strip():
            comps[cur].append(re.sub(r"/\*.*?\*/", "", line.strip()))  # drop /*index=5*/ comments
    if entry is None:
        raise ValueError("no ENTRY computation in this HLO text")
    return comps, entry


def _kernel(ins: str) -> tuple[str, str]:
    """(kind, source op name) of a launching instruction."""
    op = re.match(r"(?:ROOT )?%?[\w.\-]+ = .*? ([\w\-]+)\(", ins).group(1)
    kind = op
    if op == "fusion":
        fused = re.search(r"calls=%?([\w\-]+)", ins).group(1)
        kind = "fusion:" + (re.search(r'"custom_fusion_config":\{"name":"([^"]+)"', ins) or
                            re.search(r"kind=(\w+)", ins)).group(1) + ":" + fused
    elif op == "custom-call":
        kind = "library:" + re.search(r'custom_call_target="([^"]+)"', ins).group(1)
    src = re.search(r'op_name="([^"]+)"', ins)
    return kind, src.group(1) if src else ""


def kernel_tree(comps: dict[str, list[str]], comp: str) -> dict:
    """{"kernels": [(kind, source)], "loops": [{"trip": n or None, "body": tree}], "branches": [[tree, ...]]}
    for one computation: the kernels it launches itself, and the loops (bodies) and conditionals it runs."""
    node = {"kernels": [], "loops": [], "branches": []}
    for ins in comps[comp]:
        m = re.match(r"(?:ROOT )?%?[\w.\-]+ = .*? ([\w\-]+)\(", ins)
        if not m:
            continue
        op = m.group(1)
        if op == "while":
            trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins)
            body = re.search(r"body=%?([\w.\-]+)", ins).group(1)
            cond = re.search(r"condition=%?([\w.\-]+)", ins).group(1)
            # XLA skips a loop's condition when it knows the trip count; otherwise it runs every iteration.
            loop = {"trip": int(trip.group(1)) if trip else None, "body": kernel_tree(comps, body)}
            if not trip:
                loop["body"]["kernels"] += kernel_tree(comps, cond)["kernels"]
            node["loops"].append(loop)
        elif op == "conditional":
            names = re.findall(r"%?([\w.\-]+)", (re.search(r"branch_computations=\{([^}]*)\}", ins) or
                                                 re.search(r"(true_computation=\S+ false_computation=\S+)", ins)
                                                 ).group(1).replace("true_computation=", "").replace(
                                                     "false_computation=", ""))
            node["branches"].append([kernel_tree(comps, n) for n in names if n in comps])
        elif op == "call":
            node["kernels"] += kernel_tree(comps, re.search(r"to_apply=%?([\w.\-]+)", ins).group(1))["kernels"]
        elif op not in _FREE:
            node["kernels"].append(_kernel(ins))
    return node


def total(node: dict) -> int:
    """Kernels one run of the computation launches (loops times their trip count; a conditional: its
    largest branch)."""
    n = len(node["kernels"])
    n += sum((loop["trip"] or 1) * total(loop["body"]) for loop in node["loops"])
    n += sum(max(total(b) for b in branches) for branches in node["branches"])
    return n


def scope_of(source: str) -> str:
    """The model part a kernel comes from, by the named scopes in its op name."""
    for scope in ("attention_xla", "stablelm_attention", "mla", "moe", "mlp", "checkpoint"):
        if f"/{scope}" in source or source.startswith(scope):
            return "norm" if scope == "checkpoint" else scope
    return source.rsplit("/", 1)[-1] or "(none)"


# ----------------------------------------------------------------------------------------- compiling


def program_hlo(name: str, program: str, batch: int, length: int, target: str) -> str:
    """Optimised HLO of bench_generate's model `name` for `target`: program "decode" (one `generate` decode step
    over a static cache of `length` slots, half full) or "prefill" (a prompt of `length` tokens into a fresh
    cache, as `generate` runs it)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bench_generate import MODELS
    from jaxmodels.cache import init_cache
    from jaxmodels.config import config_from_hf
    from jaxmodels.model import abstract_model
    from jaxmodels.generate import steps as G

    topo = _topology(target)
    on = jax.sharding.SingleDeviceSharding(topo.devices[0])

    def spec(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on), tree)

    cfg = config_from_hf(MODELS[name])
    model = abstract_model(cfg, jnp.bfloat16)
    graphdef, state = nnx.split(model)
    if program == "decode":
        cache = jax.eval_shape(lambda: init_cache(cfg, G._stack_sizes(model), batch, length, jnp.bfloat16))
        ints = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=on)
        kv_valid = jax.ShapeDtypeStruct((batch, length), jnp.bool_, sharding=on)
        index = jax.ShapeDtypeStruct((), jnp.int32, sharding=on)  # the slot written (mid-cache)
        lowered = G._jitted("decode_step", model.options).lower(graphdef, spec(state), spec(cache), ints, ints,
                                                                kv_valid, index)
    else:
        ids = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=on)
        lowered = G._jitted("prefill", model.options).lower(graphdef, spec(state), ids, ids, length)
    # With dynamic-slice fusion on, XLA (jax 0.10) fails to assign buffers for a compile-only device after its
    # HLO passes have run; the optimised HLO is dumped before that, and it is what this counts.
    with tempfile.TemporaryDirectory() as dump:
        try:
            return lowered.compile({"xla_dump_to": dump, "xla_dump_hlo_as_text": True}).as_text()
        except Exception as e:  # noqa: BLE001 - any compile failure: fall back to the dump
            found = glob.glob(os.path.join(dump, "*after_optimizations.txt"))
            if not found:
                raise RuntimeError(f"XLA did not finish its HLO passes for {name} {program}: {e}") from e
            with open(found[0]) as f:
                return f.read()


def _pretend_cuda():
    """The compile-only process runs on CPU, so attention's "auto" would pick XLA's dense path; the GPU picks
    cuDNN. Tell attention (and jax's cuDNN module, which asks the default backend) that the device is a Hopper
    with cuDNN 9.8, so the compiled step is the one the GPU runs. (A compile-only process has no other use for
    these answers.)"""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    from jaxmodels.layers import attention
    hopper = (9, 0)
    attention._cuda_facts = lambda: (hopper, 90800)
    fa.check_cudnn_version = lambda: 90800
    fa.check_compute_capability = lambda c: hopper >= tuple(int(x) for x in c.split("."))
    fa.is_cuda_compute_capability_equal = lambda c: hopper == tuple(int(x) for x in c.split("."))


def train_hlo(row: str, remat: str, target: str, optimizer_dtype: str = "float32",
              attention: str = "cudnn", options: dict | None = None) -> tuple[str, dict]:
    """(optimised HLO, compiled memory {temp, argument, output, alias} bytes) of bench_train's step for `row`
    (its model, batch and LoRA rank) with `remat`, compiled for `target`. Weights abstract, nothing allocated."""
    import functools

    import jax
    import jax.numpy as jnp

    from bench_train import CONFIGS, LORA_TARGETS, ROWS
    from jaxmodels.config import config_from_hf
    from jaxmodels.model import abstract_model
    from jaxmodels.train import step as steplib
    from jaxmodels.train.config import TrainConfig
    from jaxmodels.train.optim import optimizer

    _pretend_cuda()
    topo = _topology(target)
    on = jax.sharding.SingleDeviceSharding(topo.devices[0])
    name, b, s, _, _, lora = ROWS[row]
    cfg = config_from_hf(dict(CONFIGS[name], architectures=None))
    model = abstract_model(cfg, jnp.bfloat16 if lora else jnp.float32)
    model = model.with_options(compute_dtype=jnp.bfloat16, remat=remat, attention=attention)
    trainable = []
    if lora:
        from jaxmodels.layers.linear import LoRAParam
        from jaxmodels.train.lora import add_lora
        add_lora(model, rank=lora, alpha=2 * lora, targets=LORA_TARGETS[name])
        trainable = [LoRAParam]
    graphdef, params, frozen, buffers = steplib.split_model(model, *trainable)
    tcfg = TrainConfig(model=name, data=os.path.abspath(__file__), out="/tmp", steps=1000, batch_size=b, seq_len=s,
                       lora_rank=lora, remat=remat, optimizer_dtype=optimizer_dtype)
    tx, _ = optimizer(tcfg, 1000)

    def spec(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on), tree)

    state = {"params": params, "opt_state": jax.eval_shape(tx.init, params), "buffers": buffers,
             "step": jax.ShapeDtypeStruct((), jnp.int32)}
    ints = jax.ShapeDtypeStruct((1, b, s), jnp.int32, sharding=on)
    batch = {"input_ids": ints, "labels": ints, "segment_ids": ints, "positions": ints}
    options = steplib.COMPILER_OPTIONS if options is None else options
    step = jax.jit(functools.partial(steplib.train_step, graphdef, tx, steplib.StepOptions()), donate_argnums=(0,),
                   compiler_options=options)
    lowered = step.lower(spec(state), spec(frozen), batch)
    with tempfile.TemporaryDirectory() as dump:
        try:
            compiled = lowered.compile({**options, "xla_dump_to": dump, "xla_dump_hlo_as_text": True})
        except Exception as e:  # noqa: BLE001 - see program_hlo: count the optimised HLO XLA dumped
            found = glob.glob(os.path.join(dump, "*after_optimizations.txt"))
            if not found:
                raise RuntimeError(f"XLA did not finish its HLO passes for {row}: {e}") from e
            with open(found[0]) as f:
                return f.read(), {}
    mem = compiled.memory_analysis()
    sizes = {k: getattr(mem, f"{k}_size_in_bytes", 0) for k in ("temp", "argument", "output", "alias")}
    return compiled.as_text(), sizes


def _topology(target: str):
    import jax
    from jax.experimental import topologies
    try:
        return topologies.get_topology_desc(platform="cuda", target_config=target_config(target), topology="1x1x1")
    except (NotImplementedError, RuntimeError) as e:
        sys.exit(f"error: jax cannot compile for CUDA here ({e}). Install jax's CUDA plugin of this jax's version "
                 f"(no GPU or CUDA libraries needed): pip install \"jax-cuda12-plugin=={jax.__version__}\" "
                 f"\"jax-cuda12-pjrt=={jax.__version__}\"")


_MOVES = ("copy", "transpose")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "f64": 8, "s64": 8}


def _nbytes(shape: str) -> int:
    """Bytes of an HLO array shape such as `bf16[8,1024,2560]{2,1,0}` (0 for a tuple)."""
    m = re.match(r"(\w+)\[([\d,]*)\]", shape)
    if not m:
        return 0
    n = 1
    for d in filter(None, m.group(2).split(",")):
        n *= int(d)
    return n * _BYTES.get(m.group(1), 4)


def copies(hlo: str) -> list[tuple[int, str, str, int, str]]:
    """The kernels of a program that only move data, each with how often it runs: (runs, kind, shape, bytes
    written per run, source op). Kinds: `copy`/`transpose` instructions and fusions whose root is one;
    "slice copy" / "update copy": XLA's dynamic-slice fusions that hold no library call, i.e. a layer's slice
    copied out of a stacked buffer (weights, saved residuals) or into one (residuals, per-layer gradients).
    (A dynamic-slice fusion around a cuBLAS call reads or writes its slice in place: no copy.) Loop bodies count
    times their trip count."""
    comps, entry = computations(hlo)
    roots = {}
    for name, lines in comps.items():
        for ins in lines:
            m = re.match(r"ROOT %?[\w.\-]+ = .*? ([\w\-]+)\(", ins)
            if m:
                roots[name] = m.group(1)
    out = []

    def walk(comp, runs):
        for ins in comps[comp]:
            m = re.match(r"(?:ROOT )?%?[\w.\-]+ = (.*?) ([\w\-]+)\(", ins)
            if not m:
                continue
            shape, op = m.group(1), m.group(2)
            kind, nbytes = None, _nbytes(shape)
            if op == "while":
                trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins)
                walk(re.search(r"body=%?([\w.\-]+)", ins).group(1), runs * (int(trip.group(1)) if trip else 1))
            elif op == "call":
                walk(re.search(r"to_apply=%?([\w.\-]+)", ins).group(1), runs)
            elif op in _MOVES:
                kind = op
            elif op == "fusion":
                called = re.search(r"calls=%?([\w.\-]+)", ins).group(1)
                body = comps.get(called, [])
                if '"dynamic_slice_fusion"' in ins and not any(" custom-call(" in b for b in body):
                    update = [b for b in body if " dynamic-update-slice(" in b]
                    kind = "update copy" if update else "slice copy"
                    if update:  # bytes: the update written into the stack, not the stack
                        operand = re.search(r"dynamic-update-slice\(%?[\w.\-]+, %?([\w.\-]+)", update[0]).group(1)
                        decl = [b for b in body if re.match(rf"%?{re.escape(operand)} = ", b)]
                        nbytes = _nbytes(decl[0].split(" = ", 1)[1]) if decl else 0
                elif roots.get(called) in _MOVES:
                    kind = f"fusion({roots[called]})"
            if kind:
                src = re.search(r'op_name="([^"]+)"', ins)
                out.append((runs, kind, shape, nbytes, src.group(1) if src else ""))

    walk(entry, 1)
    return out


def train_report(row: str, remats: list[str], target: str, list_copies: bool, optimizer_dtype: str,
                 xla_options: str = "default") -> list[dict]:
    from jaxmodels.train.step import XLA_OPTION_SETS
    rows = []
    for remat in remats:
        hlo, mem = train_hlo(row, remat, target, optimizer_dtype, options=XLA_OPTION_SETS[xla_options])
        comps, entry = computations(hlo)
        moves = copies(hlo)
        runs, moved = collections.Counter(), collections.Counter()
        for n, kind, shape, nbytes, _ in moves:
            runs[kind] += n
            moved[kind] += n * nbytes
        r = {"row": row, "remat": remat, "optimizer_dtype": optimizer_dtype, "xla_options": xla_options,
             "kernels": total(kernel_tree(comps, entry)), "copies": sum(runs.values()),
             "copied_gb": sum(moved.values()) / 1e9, "copy_kinds": dict(runs),
             **{k + "_gb": v / 1e9 for k, v in mem.items()}}
        rows.append(r)
        memory = (f"temp {r['temp_gb']:.2f} GB, arguments {r['argument_gb']:.2f} GB" if mem else
                  "no memory figures (XLA's buffer assignment fails for a compile-only device with these options)")
        print(f"[{row} remat {remat}, {xla_options}] {r['kernels']} kernels, {r['copies']} copies per step moving "
              f"{r['copied_gb']:.1f} GB ({dict(runs)}), {memory}", flush=True)
        if list_copies:
            for n, kind, shape, nbytes, src in sorted(moves, key=lambda m: -m[0] * m[3]):
                print(f"  x{n:<4d} {kind:28s} {nbytes / 1e6:9.1f} MB  {shape[:48]:48s} {src[-90:]}")
    return rows


# ------------------------------------------------------------------------------------------------ main


def report(name: str, what: str, hlo: str, listing: bool) -> dict:
    comps, entry = computations(hlo)
    tree = kernel_tree(comps, entry)
    layers = [(loop["trip"], loop["body"]) for loop in tree["loops"]]
    row = {"model": name, "program": what, "total": total(tree), "outside_layers": len(tree["kernels"]),
           "per_layer": [(trip, total(body)) for trip, body in layers]}
    if listing:
        for i, (trip, body) in enumerate(layers):
            print(f"\n{name} {what}, layer loop {i} (x{trip}): {total(body)} kernels per layer")
            for kind, src in body["kernels"]:
                print(f"  {kind[:58]:58s} {src[-90:]}")
        by_scope = collections.Counter(scope_of(s) for _, body in layers for _, s in body["kernels"])
        print(f"  per layer by scope (all loops): {dict(by_scope)}")
    return row


def main():
    from bench_generate import MODELS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {list(MODELS)}")
    ap.add_argument("--batches", default="1,32", help="comma-separated decode batch sizes ('' for none)")
    ap.add_argument("--cache-len", type=int, default=512, help="static cache slots of a decode step (it reads all)")
    ap.add_argument("--prefill", default="", help="comma-separated BATCHxPROMPT prefill programs, e.g. 1x2048")
    ap.add_argument("--target", default="h100", choices=sorted(TARGETS))
    ap.add_argument("--list", action="store_true", help="print each layer loop's kernels with their source ops")
    ap.add_argument("--train", default="", help="comma-separated bench_train rows: count their training step instead")
    ap.add_argument("--remats", default="save_matmuls", help="with --train: comma-separated remat policies")
    ap.add_argument("--optimizer-dtype", default="float32", help="with --train: AdamW's moments (float32, bf16)")
    ap.add_argument("--list-copies", action="store_true", help="with --train: every copy and its source")
    ap.add_argument("--xla-options", default="default", choices=("default", "in_place"),
                    help="with --train: the step's XLA options (jaxmodels.train.step.XLA_OPTION_SETS)")
    args = ap.parse_args()
    if args.train:
        rows = [r for row in args.train.split(",") for r in
                train_report(row, args.remats.split(","), args.target, args.list_copies, args.optimizer_dtype,
                             args.xla_options)]
        print(f"\nTraining step compiled for a compile-only {args.target} (XLA of the installed jax):\n")
        print("| row | remat | moments | XLA options | kernels | copies run | GB copied | temp GB | arguments GB | "
              "temp + arguments GB |")
        print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            mem = (f"{r['temp_gb']:.2f} | {r['argument_gb']:.2f} | {r['temp_gb'] + r['argument_gb']:.2f}"
                   if "temp_gb" in r else "- | - | -")
            print(f"| {r['row']} | {r['remat']} | {r['optimizer_dtype']} | {r['xla_options']} | {r['kernels']} | "
                  f"{r['copies']} | {r['copied_gb']:.1f} | {mem} |")
        return
    models = args.models.split(",")
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {list(MODELS)}")
    try:
        programs = [("decode", int(b), args.cache_len, f"decode b{b}") for b in args.batches.split(",") if b]
        programs += [("prefill", int(bp.split("x")[0]), int(bp.split("x")[1]), f"prefill {bp}")
                     for bp in args.prefill.split(",") if bp]
    except (ValueError, IndexError):
        ap.error(f"--batches takes integers and --prefill BATCHxPROMPT pairs, got {args.batches!r}, {args.prefill!r}")

    rows = [report(m, what, program_hlo(m, program, b, n, args.target), args.list)
            for m in models for program, b, n, what in programs]
    print(f"\nKernels per program ({args.target}; decode: one step over a {args.cache_len}-slot cache; XLA of the "
          f"installed jax):\n")
    print("| model | program | kernels | outside the layers | per layer (x layers) |")
    print("| --- | --- | ---: | ---: | --- |")
    for r in rows:
        per = ", ".join(f"{k} (x{t})" for t, k in r["per_layer"])
        print(f"| {r['model']} | {r['program']} | {r['total']} | {r['outside_layers']} | {per} |")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the CUDA plugin then skips its GPU checks; CUDA still compiles
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    main()
