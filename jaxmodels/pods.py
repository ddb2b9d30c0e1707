"""Pods, verified by compiling for them: the real programs compiled for a TPU topology or GPU nodes on any machine.

jax compiles for devices it does not have: with libtpu installed, `get_topology_desc("v5p:4x4x4", "tpu")`
describes a slice whose devices a Mesh can be built from; jax's CUDA plugin does the same for GPU nodes
(no GPU or CUDA libraries needed). The programs compiled here are the ones a run executes:

* training: `jaxmodels.train.step`'s jitted step (forward, backward, AdamW update, DeepSeek-V3's routing-bias
  update, the state donated, its shardings from the rules table), on abstract weights: ShapeDtypeStructs
  carrying their NamedShardings, nothing allocated;
* generation: `jaxmodels.generate`'s prefill program and its decode step (the cache donated).

What the compiled program tells (`compile_program`): its per-chip memory (`memory_analysis`: arguments,
temporaries, outputs, aliased donations), its HLO (collectives and their bytes, kernels), and XLA's cost analysis
(`cost_analysis`: FLOPs and bytes of memory traffic, which `roofline` turns into an estimated step time). XLA's
cost analysis counts a loop body once, whatever its trip count, so the counts are taken from the same program
with 1 and 2 layers per stack, unrolled, extrapolated to the full depth (`estimate_cost`).

`jaxmodels plan --compile` (jaxmodels/plan.py) prints all of it; this module is the machinery.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmodels import sharding
from jaxmodels.config import BaseConfig, DeepseekConfig

GiB = 2 ** 30


class TopologyError(ValueError):
    """A --topology that cannot be compiled for here (the message names the cause and the fix)."""


# ------------------------------------------------------------------------------------------- topologies

# TPU generations: the name libtpu's topology descriptions use, mesh dimensions of a slice, TensorCores per chip
# (Google Cloud's accelerator types v4-N / v5p-N count TensorCores: v5p-128 is 64 chips; v5e-N / v6e-N count
# chips), HBM per chip as the compiler budgets it (v5p: "exceeds available HBM (95.74G)" in its own error
# message), the dense bf16 peak and the HBM bandwidth per chip (Google's published figures).
TPU_GENERATIONS = {
    "v4": dict(libtpu="v4", dims=3, cores_per_chip=2, hbm=32 * GiB, peak=275e12, bandwidth=1200e9),
    "v5p": dict(libtpu="v5p", dims=3, cores_per_chip=2, hbm=int(95.74 * GiB), peak=459e12, bandwidth=2765e9),
    "v5e": dict(libtpu="v5e", dims=2, cores_per_chip=1, hbm=16 * GiB, peak=197e12, bandwidth=819e9),
    "v6e": dict(libtpu="v6e", dims=2, cores_per_chip=1, hbm=32 * GiB, peak=918e12, bandwidth=1640e9),
}

# GPUs, compiled for through jax's CUDA plugin: what XLA's GPU backend needs to know of the target
# (GpuTargetConfigProto) and the dense bf16 peak. Public figures.
GPU_TARGETS = {
    "h100": dict(name="NVIDIA H100 80GB HBM3", sms=132, bandwidth=3_352_320_000_000, memory=84_978_434_048,
                 peak=989e12),
    "h200": dict(name="NVIDIA H200", sms=132, bandwidth=4_800_000_000_000, memory=150_121_971_712, peak=989e12),
}


def gpu_target_config(target: str) -> str:
    """The GpuTargetConfigProto (text format) of a GPU_TARGETS entry, for jax's compile-only CUDA devices."""
    t = GPU_TARGETS[target]
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


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as the user wrote it
    platform: str  # "tpu" | "gpu"
    description: str  # e.g. "TPU v5p 4x4x4: 64 chips (v5p-N counts TensorCores, 2 per chip)"
    devices: tuple  # jax's compile-only devices, one per chip (per GPU)
    hbm: int  # bytes per chip
    peak_flops: float  # dense bf16 FLOP/s per chip
    bandwidth: float  # HBM bytes/s per chip

    @property
    def chips(self) -> int:
        return len(self.devices)


def slice_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The usual slice shape of a chip count: v5p 64 -> 4x4x4, 128 -> 4x4x8; v5e 8 -> 2x4 (doubling the
    smallest dimension, the last of equals, from 2x2x1 / 1x1)."""
    if chips < 1 or chips & (chips - 1):
        raise TopologyError(f"{chips} chips: slices come in powers of two")
    shape = [2, 2, 1] if dims == 3 else [1, 1]
    if dims == 3 and chips < 4:
        shape = [chips, 1, 1]
    while math.prod(shape) < chips:
        small = min(shape)
        i = max(j for j, n in enumerate(shape) if n == small)
        shape[i] *= 2
    return tuple(shape)


_TPU_NAME = re.compile(r"^(v4|v5p|v5e|v6e)(?:-(\d+)|:(\d+(?:x\d+)+))$")
_GPU_NAME = re.compile(r"^(h100|h200)x(\d+)(?:x(\d+))?$")


def parse_topology(name: str) -> Topology:
    """'v5p-128' / 'v5p:4x4x4' / 'v5e-8' / 'v6e:2x4' (TPU, needs libtpu) or 'h100x8' / 'h100x8x4' (GPU nodes:
    GPUs per node x nodes, needs jax's CUDA plugin) -> compile-only devices and the chip's facts."""
    text = name.strip().lower()
    m = _TPU_NAME.match(text)
    if m:
        gen = TPU_GENERATIONS[m.group(1)]
        if m.group(2):
            n = int(m.group(2))
            if n % gen["cores_per_chip"]:
                raise TopologyError(f"--topology {name}: {m.group(1)}-N counts TensorCores ({gen['cores_per_chip']} per "
                                    "chip); use an even N")
            shape = slice_shape(n // gen["cores_per_chip"], gen["dims"])
        else:
            shape = tuple(int(x) for x in m.group(3).split("x"))
            if len(shape) != gen["dims"]:
                raise TopologyError(f"--topology {name}: {m.group(1)} slices have {gen['dims']} dimensions")
        libtpu_name = f"{gen['libtpu']}:{'x'.join(map(str, shape))}"
        # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) for its TPU; compiling for one needs no TPU,
        # so two planning processes (or a test run beside one) may load it at once.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        try:
            from jax.experimental import topologies
            topo = topologies.get_topology_desc(topology_name=libtpu_name, platform="tpu")
        except Exception as e:  # noqa: BLE001 - libtpu missing or refusing the shape: say which
            raise TopologyError(f"--topology {name}: cannot describe TPU {libtpu_name} here ({str(e).splitlines()[0]}). "
                                "Compiling for a TPU needs libtpu: pip install \"jaxmodels[tpu-plan]\"") from None
        chips = math.prod(shape)
        # One device per chip (megacore); should libtpu report TensorCores, keep the first core of each chip.
        devices = tuple(d for d in topo.devices if getattr(d, "core_on_chip", 0) == 0)
        note = f" ({m.group(1)}-N counts TensorCores, {gen['cores_per_chip']} per chip)" if gen["cores_per_chip"] > 1 else ""
        return Topology(name, "tpu", f"TPU {m.group(1)} {'x'.join(map(str, shape))}: {chips} chips{note}",
                        devices, gen["hbm"], gen["peak"], gen["bandwidth"])
    m = _GPU_NAME.match(text)
    if m:
        target, per_node, nodes = m.group(1), int(m.group(2)), int(m.group(3) or 1)
        try:
            from jax.experimental import topologies
            topo = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(target),
                                                topology=f"1x{nodes}x{per_node}")
        except Exception as e:  # noqa: BLE001
            raise TopologyError(
                f"--topology {name}: jax cannot compile for CUDA here ({str(e).splitlines()[0]}). Install jax's CUDA "
                f"plugin of this jax's version (no GPU needed): pip install \"jax-cuda12-plugin=={jax.__version__}\" "
                f"\"jax-cuda12-pjrt=={jax.__version__}\"") from None
        t = GPU_TARGETS[target]
        return Topology(name, "gpu", f"{nodes} node(s) x {per_node} {t['name']}: {nodes * per_node} GPUs",
                        tuple(topo.devices), t["memory"], t["peak"], t["bandwidth"])
    raise TopologyError(f"--topology {name!r} is not a topology; write a TPU slice (v4-8, v5p-128, v5e-8, v6e-8 or "
                        "v5p:4x4x4) or GPU nodes (h100x8: one node of 8; h100x8x4: 4 nodes)")


def make_mesh(topology: Topology, sizes: dict[str, int]):
    """A mesh with axes (data, fsdp, expert, tensor) over the topology's devices; missing axes are 1 and one
    size may be -1 (the rest)."""
    try:
        return sharding.make_mesh(**{a: sizes.get(a, 1) for a in sharding.MESH_AXES}, devices=topology.devices)
    except sharding.ShardingError as e:
        raise TopologyError(f"--mesh on {topology.chips} chips: {e}") from None
    except NotImplementedError:
        # jax maps mesh axes onto the slice's physical axes only when each is a product of them (8 on a 4x4x4 is
        # not); then the devices in their order: the program is the same, its collectives' ICI routes may differ.
        shape = tuple(sizes.get(a, 1) for a in sharding.MESH_AXES)
        return jax.sharding.Mesh(np.asarray(topology.devices).reshape(shape), sharding.MESH_AXES,
                                 axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def default_mesh(cfg: BaseConfig, chips: int) -> dict[str, int]:
    """The starting point when no --mesh is given: experts over up to 16 chips (a power of two that divides the
    expert count), everything else FSDP. (DeepSeek-V3 on a v5p-256: 16 local experts per chip fit its full
    fine-tuning step in 86% of HBM, 8 overrun it: benchmarks/RESULTS.md, Pods.)"""
    expert = 1
    if isinstance(cfg, DeepseekConfig) and cfg.is_moe:
        while expert * 2 <= min(16, chips) and cfg.n_routed_experts % (expert * 2) == 0 and chips % (expert * 2) == 0:
            expert *= 2
    return {"data": 1, "fsdp": chips // expert, "expert": expert, "tensor": 1}


# --------------------------------------------------------------------------------------------- the programs


def placed(state, mesh, rules=None):
    """An nnx State of abstract Variables -> the same with ShapeDtypeStructs carrying their NamedShardings."""
    def one(v):
        return v.replace(value=jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.param_sharding(v, mesh, rules)))
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _sds(shape, dtype, s):
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=s)


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """What a training step is compiled for (the `jaxmodels train` flags of the same names)."""

    batch: int = 8  # rows per micro-batch (global)
    seq: int = 4096
    grad_accum: int = 1
    remat: str = "full"
    lora_rank: int | None = None
    param_dtype: Any = None  # None: float32 (full fine-tuning) / bf16 (the frozen LoRA base)
    moment_dtype: Any = jnp.float32  # AdamW's mu and nu (bf16: half the optimizer state; --optimizer-dtype)
    compute_dtype: Any = jnp.bfloat16


def abstract_model(cfg: BaseConfig, dtype, lora_rank: int | None = None):
    """The model (with LoRA adapters on the trainer's default targets) as shapes only."""
    from jaxmodels.model import model_class

    def build():
        model = model_class(cfg)(cfg, dtype=dtype, rngs=nnx.Rngs(0))
        if lora_rank:
            from jaxmodels.train.lora import add_lora, default_targets
            add_lora(model, rank=lora_rank, alpha=2 * lora_rank, targets=default_targets(cfg))
        return model

    return nnx.eval_shape(build)


def _optimizer(moment_dtype):
    """The trainer's optimizer with `jaxmodels train`'s default settings (train.optim.optimizer), its AdamW
    moments stored in moment_dtype."""
    import types

    from jaxmodels.train.config import TrainConfig
    from jaxmodels.train.optim import optimizer
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    defaults["optimizer_dtype"] = "bf16" if jnp.dtype(moment_dtype) == jnp.bfloat16 else "float32"
    tx, _ = optimizer(types.SimpleNamespace(**defaults), 1000)
    return tx


def train_program(cfg: BaseConfig, mesh, setup: TrainSetup, *, scan: bool = True, rules=None):
    """(jitted step, abstract arguments) of the trainer's step for this model, mesh and setup."""
    from jaxmodels.train import step as steplib
    from jaxmodels.layers.linear import LoRAParam

    param_dtype = setup.param_dtype or (jnp.bfloat16 if setup.lora_rank else jnp.float32)
    model = abstract_model(cfg, param_dtype, setup.lora_rank)
    model = model.with_options(scan=scan, remat=setup.remat, compute_dtype=setup.compute_dtype, mesh=mesh,
                               rules=rules)
    graphdef, params, frozen, buffers = steplib.split_model(model, LoRAParam if setup.lora_rank else nnx.Param)
    params, frozen, buffers = (placed(s, mesh, rules) for s in (params, frozen, buffers))
    tx = _optimizer(setup.moment_dtype)
    replicated = NamedSharding(mesh, P())
    opt_state = steplib.abstract_opt_state(tx, params, replicated)
    state = {"params": params, "opt_state": opt_state, "buffers": buffers,
             "step": _sds((), jnp.int32, replicated)}
    has_bias = isinstance(cfg, DeepseekConfig) and cfg.num_moe_layers > 0 and cfg.topk_method == "noaux_tc"
    opts = steplib.StepOptions(task="causal_lm", bias_update_rate=1e-3 if has_bias else 0.0)
    shape = (setup.grad_accum, setup.batch, setup.seq)
    batch = {k: _sds(shape, jnp.int32, sharding.batch_sharding(mesh, shape, rules, micro=True))
             for k in ("input_ids", "labels", "segment_ids", "positions")}
    step, _ = steplib.compile_steps(graphdef, tx, opts, state, frozen)
    return step, (state, frozen, batch)


def generate_programs(cfg: BaseConfig, mesh, *, batch: int, prompt: int, cache_len: int, scan: bool = True,
                      dtype=jnp.bfloat16, rules=None):
    """{"prefill": (jitted, args), "decode": (jitted, args)}: generate's two programs for this mesh."""
    from jaxmodels.cache import init_cache
    from jaxmodels.generate import steps

    model = abstract_model(cfg, dtype).with_options(scan=scan, mesh=mesh, rules=rules)
    if mesh.devices.flat[0].platform in ("cuda", "gpu"):
        # XLA (jax 0.10) fails to assign buffers for a compile-only GPU with dynamic-slice fusion on
        # ("BufferAllocation::Slice not assigned"): the plan compiles generate's programs without it.
        options = dict(model.options.generate_compiler_options)
        options.pop("xla_gpu_enable_dynamic_slice_fusion", None)
        model = model.with_options(compiler_options=options)
    graphdef, state = nnx.split(model)
    state = placed(state, mesh, rules)
    ids = _sds((batch, prompt), jnp.int32, sharding.batch_sharding(mesh, (batch, prompt), rules))
    stacks = steps._stack_sizes(model)
    cache = jax.eval_shape(lambda: init_cache(cfg, stacks, batch, cache_len, dtype))
    cache = jax.tree.map(lambda x, s: _sds(x.shape, x.dtype, s), cache, sharding.cache_shardings(cache, mesh, rules))
    rows = sharding.batch_sharding(mesh, (batch,), rules)
    ints = _sds((batch,), jnp.int32, rows)
    kv_valid = _sds((batch, cache_len), jnp.bool_, sharding.batch_sharding(mesh, (batch, cache_len), rules))
    # The decode step writes one slot (the cache index, a traced scalar: any slot compiles the same program).
    index = _sds((), jnp.int32, NamedSharding(mesh, P()))
    options = model.options
    return {"prefill": (steps.prefill_program(options), (graphdef, state, ids, ids, cache_len)),
            "decode": (steps.decode_program(options), (graphdef, state, cache, ints, ints, kv_valid, index))}


# ----------------------------------------------------------------------------------------------- compiling


@dataclasses.dataclass
class Compiled:
    """What one compiled program says about itself (per chip)."""

    arguments: int
    outputs: int
    temporaries: int
    aliased: int  # outputs written into donated arguments
    code: int
    flops: float  # XLA's count, loop bodies once (see estimate_cost)
    bytes_accessed: float  # XLA's count of memory traffic, loop bodies once
    compile_s: float
    hlo: str
    error: str | None = None  # the compiler's refusal (e.g. over HBM), when it refused

    @property
    def peak(self) -> int:
        """Bytes live at the peak: arguments + temporaries + the outputs not written over donated arguments."""
        return self.arguments + self.temporaries + self.outputs - self.aliased

    @property
    def out_of_memory(self) -> bool:
        """The compiler refused the program for lack of memory (any other error says nothing about fitting)."""
        text = (self.error or "").lower()
        return "resource_exhausted" in text or "exceeds" in text or "out of memory" in text


def compile_program(jitted, args, static: tuple = ()) -> Compiled:
    """Lowers and compiles for the arguments' devices; a refusal (memory) comes back as `error`."""
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - XLA's refusal is a result here, not a crash
        msg = str(e)
        line = next((ln for ln in msg.splitlines() if "exceeds" in ln or "memory" in ln.lower()), msg.splitlines()[0])
        return Compiled(0, 0, 0, 0, 0, 0.0, 0.0, time.perf_counter() - start, "", error=line.strip()[:400])
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    # (XLA's own `optimal_seconds` is not used: its TPU cost model has no figure for some custom calls -- Pallas
    # kernels, and others it counts as -1 second each -- so it cannot be corrected reliably; see estimate_cost.)
    return Compiled(mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.temp_size_in_bytes,
                    mem.alias_size_in_bytes, mem.generated_code_size_in_bytes, float(cost.get("flops", 0.0)),
                    float(cost.get("bytes accessed", 0.0)), seconds, compiled.as_text())


def pallas_calls(hlo: str) -> list[str]:
    """Names of the Pallas (Mosaic TPU) kernel call sites in an HLO module, XLA's own ragged-dot kernels aside."""
    names = re.findall(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*custom_call_target=\"tpu_custom_call\"", hlo, re.M)
    return [n for n in names if not n.startswith("ragged-dot")]


# ---------------------------------------------------------------------------------------------- the HLO

_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
                "ragged-all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]")


def _array_bytes(text: str) -> list[int]:
    out = []
    for dtype, dims in _ARRAY.findall(text):
        if dtype in _DTYPE_BYTES:
            out.append(_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d))
    return out


def hlo_computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    """({computation: instruction lines}, entry name) of an HLO module's text."""
    comps, entry, cur = {}, None, None
    for line in hlo.splitlines():
        m = re.match(r"^(ENTRY )?%?([\w.\-]+) \(.*\{\s*$", line)
        if m:
            cur = m.group(2)
            comps[cur] = []
            entry = cur if m.group(1) else entry
        elif line.rstrip() == "}":
            cur = None
        elif cur and line.startswith("  "):
            comps[cur].append(line.strip())
        elif cur and comps[cur] and line.strip():  # a backend config spread over lines (TPU kernels' metadata)
            comps[cur][-1] += " " + line.strip()
    return comps, entry


def execution_counts(hlo: str) -> tuple[dict[str, list[str]], dict[str, int]]:
    """(computations, times each runs per program): loop bodies count their known trip counts (an unknown
    trip count counts once)."""
    comps, entry = hlo_computations(hlo)
    runs: dict[str, int] = {}

    def visit(name, times):
        if name not in comps:
            return
        runs[name] = runs.get(name, 0) + times
        for ins in comps[name]:
            if " while(" in ins:
                trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins)
                body = re.search(r"body=%?([\w.\-]+)", ins)
                if body:
                    visit(body.group(1), times * (int(trip.group(1)) if trip else 1))
                continue
            for callee in re.findall(r"(?:calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)", ins):
                visit(callee, times)
            branches = re.search(r"branch_computations=\{([^}]*)\}", ins)
            if branches:
                for callee in re.findall(r"%?([\w.\-]+)", branches.group(1)):
                    visit(callee, times)

    if entry is not None:
        visit(entry, 1)
    return comps, runs


def collectives(hlo: str) -> dict[str, tuple[int, int]]:
    """{collective: (executions per program, bytes per chip per program)}: each collective's result bytes
    (an all-gather's gathered output, an all-reduce's reduced buffers) times the times it runs."""
    comps, runs = execution_counts(hlo)
    out: dict[str, list[int]] = {}
    for name, times in runs.items():
        for ins in comps[name]:
            m = re.match(r"(?:ROOT )?%?[\w.\-]+ = (.*?) ([a-z\-]+)\(", ins)
            if not m:
                continue
            op = m.group(2)
            base = op[:-len("-start")] if op.endswith("-start") else op
            if base not in _COLLECTIVES or op.endswith("-done"):
                continue
            sizes = _array_bytes(m.group(1))
            if op.endswith("-start") and base in ("all-gather", "collective-permute") and len(sizes) >= 2:
                sizes = [sizes[1]]  # (operand, output, ...): the output
            entry = out.setdefault(base, [0, 0])
            entry[0] += times
            entry[1] += times * sum(sizes)
    return {k: (v[0], v[1]) for k, v in sorted(out.items())}


def kernels(hlo: str) -> dict[str, int]:
    """{kernel: executions per program} of the ops that choose an implementation: Pallas/Mosaic custom calls
    (splash attention, megablox gmm/tgmm) by kernel name, other custom calls (cuDNN, cuBLAS) by target, and XLA's
    ragged dots."""
    comps, runs = execution_counts(hlo)
    out: dict[str, int] = {}
    for name, times in runs.items():
        for ins in comps[name]:
            key = None
            if " custom-call(" in ins:
                target = re.search(r'custom_call_target="([^"]+)"', ins)
                target = target.group(1) if target else "?"
                if target == "tpu_custom_call":  # a Mosaic kernel: the instruction is named after it
                    name_ = re.match(r"(?:ROOT )?%?([\w\-]+?)(?:\.\d+)*\s*=", ins)
                    key = f"tpu:{name_.group(1) if name_ else '?'}"
                else:
                    key = target
                if target in ("Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape", "MoveToHost",
                              "MoveToDevice", "AllocateBuffer", "LayoutConstraint", "AssumeGatherIndicesInBound",
                              "GatherScatterIndicesBitpacked", "PrepareAsyncCallStart", "PrepareAsyncCallDone",
                              "AsyncCollectiveStart", "AsyncCollectiveDone", "ConcatBitcast"):  # plumbing, no kernel
                    key = None
            elif re.search(r" ragged-dot\(", ins):
                key = "xla:ragged-dot"
            if key:
                out[key] = out.get(key, 0) + times
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------------ step time (estimate)


def shallow(cfg: BaseConfig, layers: dict[str, int]) -> BaseConfig:
    """The same model with `layers` {stack: layers} layers per stack (DeepSeek: dense_layers, moe_layers)."""
    if isinstance(cfg, DeepseekConfig):
        dense, moe = layers.get("dense_layers", 0), layers.get("moe_layers", 0)
        return dataclasses.replace(cfg, num_hidden_layers=dense + moe, first_k_dense_replace=dense)
    return dataclasses.replace(cfg, num_hidden_layers=layers.get("layers", 0))


def stack_depths(cfg: BaseConfig) -> dict[str, int]:
    if isinstance(cfg, DeepseekConfig):
        return {k: v for k, v in (("dense_layers", cfg.num_dense_layers), ("moe_layers", cfg.num_moe_layers)) if v}
    return {"layers": cfg.num_hidden_layers}


def estimate_cost(build, cfg: BaseConfig, progress: bool = False) -> tuple[float, float, float]:
    """(FLOPs, bytes accessed, compile seconds) of a program at the model's full depth, per chip: the compiler's
    counts (`cost_analysis`).

    build(cfg, scan) -> (jitted, args). XLA's cost analysis counts a loop body once, so the program is compiled
    unrolled with one layer per stack, then with one more layer in each stack in turn; the differences are each
    stack's per-layer cost, extrapolated linearly to the full depth. `roofline` turns the counts into time.
    """
    depths = stack_depths(cfg)
    base = {k: 1 for k in depths}

    def cost(layers):
        c = compile_program(*build(shallow(cfg, layers), False))
        if c.error:
            raise TopologyError(f"the {layers} layer program did not compile: {c.error}")
        if progress:
            print(f"  step-time estimate: {layers} layer program unrolled, compiled in {c.compile_s:.0f} s", flush=True)
        return c.flops, c.bytes_accessed, c.compile_s

    f0, b0, t0 = cost(base)
    flops, moved, spent = f0, b0, t0
    for name, n in depths.items():
        f1, b1, t1 = cost(dict(base, **{name: 2}))
        flops += (n - 1) * (f1 - f0)
        moved += (n - 1) * (b1 - b0)
        spent += t1
    return flops, moved, spent


def roofline(flops: float, moved: float, topology: Topology) -> float:
    """Seconds of a program doing `flops` and moving `moved` bytes of HBM on one chip of the topology, at its peak
    FLOP/s or its HBM bandwidth, whichever binds (collectives assumed overlapped): an estimate, not a timing."""
    return max(flops / topology.peak_flops, moved / topology.bandwidth)
