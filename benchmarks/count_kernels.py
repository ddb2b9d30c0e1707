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

# What XLA's GPU backend needs to know of the target (GpuTargetConfigProto, text format): public figures.
TARGETS = {
    "h100": dict(name="NVIDIA H100 80GB HBM3", sms=132, bandwidth=3_352_320_000_000, memory=84_978_434_048),
    "h200": dict(name="NVIDIA H200", sms=132, bandwidth=4_800_000_000_000, memory=150_121_971_712),
}

# HLO instructions that launch nothing on the device (loops, branches and calls are walked into instead).
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "add-dependency",
         "opt-barrier", "partition-id", "replica-id"}


def target_config(target: str) -> str:
    t = TARGETS[target]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: {t['sms']} fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {t['bandwidth']} l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: {t['memory']} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 }} registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{t['name']}"
"""


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
    from jax.experimental import topologies

    from bench_generate import MODELS
    from jaxmodels.cache import init_cache
    from jaxmodels.config import config_from_hf
    from jaxmodels.model import abstract_model
    import jaxmodels.generate  # noqa: F401
    G = sys.modules["jaxmodels.generate"]  # the module (jaxmodels.generate is the function)

    try:
        topo = topologies.get_topology_desc(platform="cuda", target_config=target_config(target), topology="1x1x1")
    except (NotImplementedError, RuntimeError) as e:
        sys.exit(f"error: jax cannot compile for CUDA here ({e}). Install jax's CUDA plugin of this jax's version "
                 f"(no GPU or CUDA libraries needed): pip install \"jax-cuda12-plugin=={jax.__version__}\" "
                 f"\"jax-cuda12-pjrt=={jax.__version__}\"")
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
    args = ap.parse_args()
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
