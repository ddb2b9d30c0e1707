"""Meshes and the one table that maps logical axis names onto them.

Every parameter carries logical axis names in its `axes` metadata (`('layers', 'experts', 'embed',
'moe_mlp')`, `('heads', 'embed')`, ...); block-boundary activations, batches and caches name theirs
here. `RULES` maps each logical name to a mesh axis, a tuple of mesh axes, or None (replicated), and
that table alone decides where everything lives. The mesh axes are

* `data`   -- pure data parallelism (parameters replicated);
* `fsdp`   -- data parallelism with parameters sharded over their `embed` dimension (ZeRO-3): each layer's
              weights are all-gathered inside the layer scan when that layer runs;
* `expert` -- routed experts split across devices (the MoE block dispatches tokens with `jax.shard_map`,
              see `jaxmodels.layers.moe.expert_parallel`); outside MoE blocks it is one more batch axis;
* `tensor` -- Megatron-style tensor parallelism over heads, MLP/expert intermediate and vocabulary.

A 1-device mesh is the special case where every axis has size 1; no code path is "unsharded only".

Typical use::

    mesh = jaxmodels.make_mesh(fsdp=2, expert=2, tensor=2)           # -1 = "the rest of the devices"
    model = jaxmodels.from_pretrained(path, mesh=mesh)               # each device reads only its slices
    logits = model(input_ids).logits
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

MeshAxes = str | tuple[str, ...] | None

# logical axis -> mesh axis / axes / None. Parameters use the first group, activations the second.
RULES: dict[str, MeshAxes] = {
    # ---- parameters ----
    "layers": None,  # scanned over, never split: each device holds its slice of every layer
    "vocab": "tensor",
    # FSDP over every data-parallel axis: the batch is split over expert too, so the weights outside the routed
    # experts are split over (fsdp, expert) like it (ZeRO-3 over all of the batch's devices; DeepSeek-V3 on a
    # v5p-256: 10.5 GiB per chip less of weights + AdamW state, jaxmodels plan --compile).
    "embed": ("fsdp", "expert"),
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "moe_mlp": "tensor",
    "experts": "expert",
    "expert_embed": "fsdp",  # the routed experts' hidden dimension: their `experts` dimension takes `expert`
    # MLA's up-projections have no `embed` dimension; FSDP splits them over their latent input instead.
    # q_b_proj's input is named apart (`q_lora_in`) from q_a_proj's output (`q_lora`): q_a_proj is
    # (q_lora, embed) and already uses fsdp for `embed`.
    "q_lora": None,
    "q_lora_in": ("fsdp", "expert"),
    "kv_lora": ("fsdp", "expert"),
    # ---- activations, batches, caches ----
    # The batch also splits over `expert`: outside the MoE blocks the expert devices would otherwise all
    # compute the same attention; inside, the MoE block all-gathers tokens over `expert` (see moe.py).
    "batch": ("data", "fsdp", "expert"),
    "seq": None,
    "cache_seq": None,
    "act_embed": None,  # hidden states between blocks: the batch already uses fsdp
    "act_vocab": "tensor",
}

ACTIVATION_AXES = ("batch", "seq", "act_embed")  # [batch, seq, hidden] between blocks

# Static cache buffers (jaxmodels.cache), by field name: [layers, batch, T, ...].
CACHE_AXES: dict[str, tuple[str | None, ...]] = {
    "latent": ("layers", "batch", "cache_seq", None),  # [..., c_kv | k_pe]
    "kv": ("layers", "batch", "cache_seq", None, "kv_heads", "head_dim"),  # [..., k | v, kv_heads, head_dim]
}


class ShardingError(ValueError):
    """A mesh or rules table that cannot place an array (the message names the axis and the fix)."""


# ----------------------------------------------------------------------------------------------------
# Meshes
# ----------------------------------------------------------------------------------------------------

def maybe_initialize_distributed() -> None:
    """Calls `jax.distributed.initialize()` once when the environment describes a multi-process run
    (JAX_COORDINATOR_ADDRESS, or a cluster jax auto-detects: SLURM, Open MPI, TPU pods via their env).
    See `jaxmodels.distributed` for the flags and the mesh across slices."""
    from jaxmodels import distributed

    distributed.maybe_initialize()


def make_mesh(data: int = 1, fsdp: int = 1, expert: int = 1, tensor: int = 1, *, devices=None) -> Mesh:
    """A mesh with axes (data, fsdp, expert, tensor) over all devices (of all processes).

    One size may be -1: it takes the devices the others leave. The product must equal the number of
    devices (pass `devices=` to use a subset). Axes are `Auto`, so XLA partitions everything the rules
    table does not pin down. On a multi-process run started with the usual environment variables,
    `jax.distributed.initialize()` is called first.
    """
    maybe_initialize_distributed()
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor}
    rest = [k for k, v in sizes.items() if v == -1]
    if len(rest) > 1:
        raise ShardingError(f"only one mesh axis may be -1, got {rest}")
    for k, v in sizes.items():
        if v != -1 and (not isinstance(v, int) or v < 1):
            raise ShardingError(f"mesh axis {k}={v!r} must be a positive integer or -1")
    known = math.prod(v for v in sizes.values() if v != -1)
    if rest:
        if len(devices) % known:
            raise ShardingError(f"{len(devices)} devices do not divide by the other axes' product {known}")
        sizes[rest[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ShardingError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, but {len(devices)} are "
                            "available; make the product match (or use -1 for one axis)")
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * 4,
                         devices=devices)


def parse_mesh(text: str) -> dict[str, int]:
    """'fsdp=64,expert=8' -> {'fsdp': 64, 'expert': 8} (the CLI's --mesh)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise ShardingError(f"bad --mesh entry {part!r}: use axis=size, e.g. fsdp=64,expert=8")
        k, v = (s.strip() for s in part.split("=", 1))
        if k not in MESH_AXES:
            raise ShardingError(f"unknown mesh axis {k!r}; the axes are {MESH_AXES}")
        out[k] = int(v)
    return out


def _axis_sizes(mesh) -> dict[str, int]:
    """Mesh, AbstractMesh or a plain {axis: size} dict -> {axis: size}."""
    if isinstance(mesh, Mapping):
        return dict(mesh)
    return dict(mesh.shape)


# ----------------------------------------------------------------------------------------------------
# The rules table
# ----------------------------------------------------------------------------------------------------

def make_rules(rules: Mapping[str, MeshAxes] | tuple | None = None) -> dict[str, MeshAxes]:
    """The default table updated with the user's overrides (logical name -> mesh axes or None).
    Also accepts the frozen (hashable) form `freeze_rules` returns."""
    out = dict(RULES)
    if rules:
        out.update(dict(rules))
    return out


def _as_tuple(v: MeshAxes) -> tuple[str, ...]:
    if v is None:
        return ()
    return (v,) if isinstance(v, str) else tuple(v)


def mesh_axes_of(name: str | None, rules: Mapping[str, MeshAxes] | None = None, mesh=None) -> tuple[str, ...]:
    """The mesh axes logical axis `name` maps to (those present in `mesh`, when given)."""
    if name is None:
        return ()
    rules = make_rules(rules)
    if name not in rules:
        raise ShardingError(f"logical axis {name!r} is not in the sharding rules table; add it "
                            f"(rules={{'{name}': None or a mesh axis}}); known: {sorted(rules)}")
    axes = _as_tuple(rules[name])
    if mesh is not None:
        sizes = _axis_sizes(mesh)
        axes = tuple(a for a in axes if a in sizes)
    return axes


def logical_to_spec(axes, rules=None, mesh=None, shape=None) -> P:
    """Logical axis names -> PartitionSpec.

    A mesh axis used by two dimensions is an error. With `mesh` and `shape`, mesh axes that do not divide
    their dimension are dropped from the end of that dimension's tuple (that dimension is then split less,
    or replicated) rather than failing: e.g. a batch of 1 during decode on a data-parallel mesh.
    """
    rules = make_rules(rules)
    sizes = _axis_sizes(mesh) if mesh is not None else None
    entries, used = [], {}
    for dim, name in enumerate(axes):
        mesh_axes = mesh_axes_of(name, rules, mesh)
        for a in mesh_axes:
            if a in used:
                raise ShardingError(f"logical axes {tuple(axes)} map mesh axis {a!r} twice (for {used[a]!r} and "
                                    f"{name!r}); change the rules table so each mesh axis appears once per array")
            used[a] = name
        if sizes is not None and shape is not None:
            while mesh_axes and shape[dim] % math.prod(sizes[a] for a in mesh_axes):
                mesh_axes = mesh_axes[:-1]
        entries.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


def mesh_axes_of_spec(spec: P, dim: int) -> tuple[str, ...]:
    """The mesh axes dimension `dim` of a PartitionSpec is split over."""
    return _as_tuple(spec[dim] if dim < len(spec) else None)


def trim_spec(spec: P, mesh) -> P:
    """The same placement without the mesh axes of size 1 (for shard_map specs)."""
    sizes = _axis_sizes(mesh)
    entries = []
    for entry in spec:
        axes = tuple(a for a in _as_tuple(entry) if sizes[a] > 1)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


def var_axes(var) -> tuple[str | None, ...]:
    """The logical axes of an nnx Variable (all None when it names none)."""
    axes = var.get_metadata().get("axes") if hasattr(var, "get_metadata") else None
    ndim = len(var.shape)
    if axes is None:
        return (None,) * ndim
    if len(axes) != ndim:
        raise ShardingError(f"parameter of shape {tuple(var.shape)} names {len(axes)} logical axes {axes}")
    return tuple(axes)


def param_spec(var, mesh=None, rules=None) -> P:
    return logical_to_spec(var_axes(var), rules, mesh, tuple(var.shape))


def param_sharding(var, mesh: Mesh, rules=None) -> NamedSharding:
    """Where one parameter (an nnx Variable, abstract or concrete) lives on `mesh`."""
    return NamedSharding(mesh, param_spec(var, mesh, rules))


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state, mesh: Mesh, rules=None):
    """The nnx State tree with a NamedSharding in place of each variable's value (for jit out_shardings)."""
    return jax.tree.map(lambda v: v.replace(value=param_sharding(v, mesh, rules)), state, is_leaf=_is_var)


def _put(x, target: NamedSharding):
    # A value held by this process alone (e.g. LoRA adapters just initialised, the same on every process)
    # cannot be device_put onto a mesh spanning other processes; its host copy can.
    if isinstance(x, jax.Array) and x.is_fully_addressable and not target.is_fully_addressable:
        x = np.asarray(x)
    return jax.device_put(x, target)


def shard_state(state, mesh: Mesh, rules=None):
    """Moves every variable of an nnx State onto the mesh by the table."""
    return jax.tree.map(lambda v: v.replace(value=_put(v.get_value(), param_sharding(v, mesh, rules))),
                        state, is_leaf=_is_var)


def shard_model(model, mesh: Mesh, rules=None):
    """The model's parameters moved onto the mesh by the table, as a model whose options run it there
    (`model.with_options(mesh=mesh, rules=rules)`: activations constrained, MoE expert-parallel). The input
    model keeps its options; its arrays are the moved ones."""
    nnx.update(model, shard_state(nnx.state(model), mesh, rules))
    return model.with_options(mesh=mesh, rules=rules)


def freeze_rules(rules) -> tuple:
    """A hashable form of a rules table (it lives in the model's static graph definition)."""
    return tuple(sorted((k, _as_tuple(v)) for k, v in make_rules(rules).items()))


# ----------------------------------------------------------------------------------------------------
# Activations inside the model: placed by the model's options (jaxmodels.options.Options.mesh / rules)
# ----------------------------------------------------------------------------------------------------

def constrain(x: jax.Array, axes, options) -> jax.Array:
    """with_sharding_constraint by logical axis names on `options.mesh`; a no-op without a mesh."""
    mesh = getattr(options, "mesh", None)
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, options.rules, mesh, x.shape)))


# ----------------------------------------------------------------------------------------------------
# Batches and caches
# ----------------------------------------------------------------------------------------------------

def batch_sharding(mesh: Mesh, shape, rules=None, *, micro: bool = False) -> NamedSharding:
    """[batch, ...] split over the table's batch axes (those that divide the batch), the rest replicated;
    micro=True: [micro-batches, batch, ...] (a training step's gradient-accumulation stack)."""
    axes = ((None, "batch") if micro else ("batch",))
    axes += (None,) * (len(shape) - len(axes))
    return NamedSharding(mesh, logical_to_spec(axes, rules, mesh, shape))


def shard_batch(x, mesh: Mesh, rules=None, *, micro: bool = False, rows: int | None = None):
    """Host arrays [batch, ...] (or a pytree of them, e.g. a training batch dict) as global arrays on the mesh
    (see batch_sharding).

    rows=None: every process holds the same full batch and transfers only the rows its devices hold.
    rows=N: the global batch has N rows and each process holds only its own share of them (multi-host
    training reads just those: `train.step.process_shard`); the global array is assembled from every
    process's share (`jax.make_array_from_process_local_data`).
    """
    dim = 1 if micro else 0

    def one(a):
        a = np.asarray(a)
        if rows is None:
            return jax.make_array_from_callback(a.shape, batch_sharding(mesh, a.shape, rules, micro=micro),
                                                lambda idx: a[idx])
        shape = a.shape[:dim] + (rows,) + a.shape[dim + 1:]
        return jax.make_array_from_process_local_data(batch_sharding(mesh, shape, rules, micro=micro), a, shape)

    return jax.tree.map(one, x)


def cache_shardings(cache, mesh: Mesh, rules=None):
    """NamedShardings for a static cache pytree ({stack: MLACache | KVCache}), by CACHE_AXES."""

    def one(path, leaf):
        name = str(getattr(path[-1], "name", getattr(path[-1], "key", "")))
        axes = CACHE_AXES.get(name, (None,) * np.ndim(leaf))
        return NamedSharding(mesh, logical_to_spec(axes, rules, mesh, np.shape(leaf)))

    return jax.tree_util.tree_map_with_path(one, cache)


def constrain_cache(cache, options):
    """Constrains a static cache pytree to the table's layout on `options.mesh` (no-op without one)."""
    mesh = getattr(options, "mesh", None)
    if mesh is None or cache is None:
        return cache
    return jax.lax.with_sharding_constraint(cache, cache_shardings(cache, mesh, options.rules))


# ----------------------------------------------------------------------------------------------------
# Bytes per device, from shapes only (for `jaxmodels plan`)
# ----------------------------------------------------------------------------------------------------

def shard_shape(shape, spec: P, mesh) -> tuple[int, ...]:
    """The per-device block shape of an array of `shape` with `spec` (ceil for uneven splits)."""
    sizes = _axis_sizes(mesh)
    out = []
    for dim, n in enumerate(shape):
        entry = spec[dim] if dim < len(spec) else None
        k = math.prod(sizes[a] for a in _as_tuple(entry))
        out.append(-(-n // k))
    return tuple(out)


def bytes_per_device(shape, dtype, axes, mesh, rules=None) -> int:
    spec = logical_to_spec(axes, rules, mesh, shape)
    return math.prod(shard_shape(shape, spec, mesh)) * jnp.dtype(dtype).itemsize


def describe(mesh) -> str:
    return ",".join(f"{a}={n}" for a, n in _axis_sizes(mesh).items())


__all__ = ["MESH_AXES", "RULES", "CACHE_AXES", "ShardingError", "make_mesh", "parse_mesh", "make_rules",
           "logical_to_spec", "param_sharding", "param_spec", "state_shardings", "shard_state", "shard_model",
           "constrain", "batch_sharding", "shard_batch",
           "cache_shardings", "constrain_cache", "shard_shape", "bytes_per_device", "trim_spec",
           "mesh_axes_of", "mesh_axes_of_spec", "freeze_rules", "maybe_initialize_distributed"]
