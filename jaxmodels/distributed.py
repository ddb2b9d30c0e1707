"""Multi-process (multi-host) runs: starting `jax.distributed`, the mesh over slices, each host's share of a batch.

One jax process per host (a TPU VM worker, or a GPU node driving its 8 GPUs). Every process runs the same
program over the global mesh; each holds only its own devices' shards. What this module provides:

* `DistributedOptions` / `parse_options`: who the coordinator is and which process this is, from the train
  CLI's `--coordinator HOST:PORT --num-processes N --process-id I`, else the environment (JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES, JAX_PROCESS_ID), else a cluster jax detects by itself (`--distributed`, or detected:
  TPU pods, SLURM, Open MPI, GKE TPU jobs). `initialize` calls `jax.distributed.initialize` with them once,
  before anything touches a device.
* `make_mesh(ici, dcn)`: the (data, fsdp, expert, tensor) mesh from the physical layout. `ici` are the axis
  sizes inside one slice (TPU ICI) or one node (NVLink); `dcn` the sizes across slices / nodes (the slower
  data-center network, `--dcn-mesh`), laid out by `mesh_utils.create_hybrid_device_mesh` so that only the
  `dcn` axes' collectives cross it. Each mesh axis is ici x dcn devices long.
* `batch_shard(sharding, shape, dim)`: which rows of a global batch this process's devices hold, as Grain
  `ShardOptions`, so the data pipeline reads only those rows; `jax.make_array_from_process_local_data`
  assembles the global array from every process's share (`jaxmodels.sharding.shard_batch(..., rows=)`).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Mapping

import jax
import numpy as np

log = logging.getLogger("jaxmodels")

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


class DistributedError(ValueError):
    """A multi-process setting that cannot work (the message names the flag or variable and the fix)."""


@dataclass(frozen=True)
class DistributedOptions:
    """How this process joins a multi-process run.

    coordinator: "host:port" of process 0 (every process passes the same). num_processes: processes in the run
    (one per host). process_id: this process, in [0, num_processes). auto: let jax detect the cluster (Cloud
    TPU pods, SLURM, Open MPI, GKE) and fill what is not given. A run is multi-process when `enabled`.
    """
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False

    @property
    def enabled(self) -> bool:
        return self.auto or self.coordinator is not None


def detected_cluster(env: Mapping[str, str] | None = None) -> str | None:
    """The multi-process cluster the environment describes (one jax auto-detects), or None.

    Only the cheap environment checks; a Cloud TPU pod started without these variables (its workers learn
    their peers from the metadata server) needs `--distributed`.
    """
    env = os.environ if env is None else env

    def count(name):
        try:
            return int(env.get(name, "1") or "1")
        except ValueError:
            return 1

    if env.get("SLURM_JOB_ID") and count("SLURM_NTASKS") > 1:
        return "SLURM"
    if count("OMPI_COMM_WORLD_SIZE") > 1:
        return "Open MPI"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "TPU pod (TPU_WORKER_HOSTNAMES)"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "multi-slice TPU (MEGASCALE_COORDINATOR_ADDRESS)"
    return None


def _int(value, what: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedError(f"{what} must be an integer, got {value!r}") from None


def parse_options(coordinator: str | None = None, num_processes: int | str | None = None,
                  process_id: int | str | None = None, auto: bool = False,
                  env: Mapping[str, str] | None = None) -> DistributedOptions:
    """The CLI flags, completed from the environment and checked.

    Flags win over JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID. Without a coordinator and
    without `auto`, a cluster jax detects (`detected_cluster`) turns `auto` on; otherwise the run is a plain
    single-process one (`enabled` False). Raises DistributedError naming the flag for an incomplete or
    inconsistent setting.
    """
    env = os.environ if env is None else env
    coordinator = coordinator or env.get(ENV_COORDINATOR) or None
    n = _int(num_processes, "--num-processes") if num_processes is not None else _int(
        env.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES)
    i = _int(process_id, "--process-id") if process_id is not None else _int(env.get(ENV_PROCESS_ID), ENV_PROCESS_ID)
    cluster = detected_cluster(env)
    auto = bool(auto or cluster)
    if coordinator is not None:
        host, sep, port = coordinator.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise DistributedError(f"--coordinator {coordinator!r} must be HOST:PORT (process 0's address and a free "
                                   "port, the same on every process), e.g. 10.0.0.2:8476")
    if n is not None and n < 1:
        raise DistributedError(f"--num-processes must be >= 1, got {n}")
    if i is not None and i < 0:
        raise DistributedError(f"--process-id must be >= 0, got {i}")
    if n is not None and i is not None and i >= n:
        raise DistributedError(f"--process-id {i} is not below --num-processes {n}; number the processes "
                               f"0..{n - 1}")
    if not auto:
        if coordinator is None and (n is not None and n > 1 or i is not None):
            raise DistributedError("--num-processes/--process-id need --coordinator HOST:PORT (process 0's address, "
                                   f"or {ENV_COORDINATOR}); on a TPU pod or a SLURM job pass --distributed instead")
        if coordinator is not None and (n is None or i is None):
            raise DistributedError(f"--coordinator {coordinator} needs --num-processes N and --process-id I (or "
                                   f"{ENV_NUM_PROCESSES} / {ENV_PROCESS_ID}) on every process, unless the cluster "
                                   "is one jax detects (--distributed)")
        if coordinator is not None and n == 1:
            coordinator = i = n = None  # one process: nothing to coordinate
    return DistributedOptions(coordinator=coordinator, num_processes=n, process_id=i, auto=auto)


def initialize(options: DistributedOptions) -> bool:
    """`jax.distributed.initialize` with `options`, once, before any device is used. Returns whether this run
    is multi-process. Does nothing for a single-process run or when already initialized."""
    if not options.enabled:
        return False
    if jax.distributed.is_initialized():
        return True
    try:
        jax.distributed.initialize(options.coordinator, options.num_processes, options.process_id)
    except RuntimeError as e:
        if "before" in str(e) or "already" in str(e):
            raise DistributedError("jax.distributed.initialize() must run before anything uses a device; start "
                                   "the multi-process run first (the train CLI does) and only then build models or "
                                   f"meshes ({e})") from None
        raise DistributedError(f"could not join the multi-process run with {options} ({e}); check that every "
                               "process got the same --coordinator and --num-processes and that process 0 is "
                               "reachable there") from None
    except ValueError as e:  # jax could not detect what was not given
        raise DistributedError(f"cannot start the multi-process run: {e}; pass --coordinator, --num-processes "
                               "and --process-id") from None
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def maybe_initialize() -> bool:
    """`initialize` from the environment alone (JAX_* variables or a detected cluster)."""
    return initialize(parse_options())


def is_primary() -> bool:
    """Process 0: the one that writes run files (config, metrics, logs); everyone writes its checkpoint shards."""
    return jax.process_index() == 0


# ----------------------------------------------------------------------------------------------------
# The mesh over slices / nodes
# ----------------------------------------------------------------------------------------------------

def granules(devices) -> tuple[str, list[list]]:
    """("slice" | "process", the devices grouped by TPU slice, else by process (a GPU node, a CPU host))."""
    slices = {getattr(d, "slice_index", None) for d in devices}
    kind = "slice" if None not in slices and len(slices) > 1 else "process"
    groups: dict[int, list] = {}
    for d in devices:
        groups.setdefault(d.slice_index if kind == "slice" else d.process_index, []).append(d)
    return kind, [groups[k] for k in sorted(groups)]


def make_mesh(ici: Mapping[str, int] | None = None, dcn: Mapping[str, int] | None = None, *, devices=None):
    """The (data, fsdp, expert, tensor) mesh over all devices of all processes.

    ici: axis sizes within one slice / node (one axis may be -1: the rest of the slice's devices; unnamed
    axes are 1, and `fsdp` takes what the named ones leave). dcn: axis sizes across slices / nodes
    (default: none; their product must be the number of slices, else of processes). Each mesh axis has
    ici x dcn devices. Without `dcn` this is `jaxmodels.sharding.make_mesh(**ici)`; a multi-slice TPU run
    must say how its slices are used.
    """
    from jax.sharding import AxisType, Mesh

    from jaxmodels import sharding

    maybe_initialize()
    devices = list(jax.devices() if devices is None else devices)
    ici = dict(ici or {})
    for name in (*ici, *(dcn or {})):
        if name not in sharding.MESH_AXES:
            raise sharding.ShardingError(f"unknown mesh axis {name!r}; the axes are {sharding.MESH_AXES}")
    kind, groups = granules(devices)
    if not dcn:
        if kind == "slice":
            raise sharding.ShardingError(
                f"the devices span {len(groups)} TPU slices joined by the data-center network; say which axes "
                f"cross it with --dcn-mesh (e.g. --dcn-mesh data={len(groups)}) and give --mesh per slice")
        if "fsdp" not in ici and math.prod(v for v in ici.values() if v != -1) != len(devices) \
                and -1 not in ici.values():
            ici["fsdp"] = -1
        return sharding.make_mesh(**ici, devices=devices)
    dcn_sizes = {a: int(dcn.get(a, 1)) for a in sharding.MESH_AXES}
    if any(v < 1 for v in dcn_sizes.values()):
        raise sharding.ShardingError(f"--dcn-mesh sizes must be positive, got {dict(dcn)}")
    if math.prod(dcn_sizes.values()) != len(groups):
        raise sharding.ShardingError(
            f"--dcn-mesh {_fmt(dcn)} spans {math.prod(dcn_sizes.values())} {kind}es, but the run has {len(groups)} "
            f"({kind} = one {'TPU slice' if kind == 'slice' else 'process: a host or GPU node'}); make the product "
            f"{len(groups)}")
    per = len(groups[0])
    if any(len(g) != per for g in groups):
        raise sharding.ShardingError(f"the {kind}es hold different numbers of devices "
                                     f"({[len(g) for g in groups]}); --dcn-mesh needs equal ones")
    sizes = {a: int(ici.get(a, 1)) for a in sharding.MESH_AXES}
    if "fsdp" not in ici and -1 not in ici.values() and math.prod(sizes.values()) != per:
        sizes["fsdp"] = -1
    rest = [a for a, v in sizes.items() if v == -1]
    known = math.prod(v for v in sizes.values() if v != -1)
    if len(rest) > 1 or any(v < 1 and v != -1 for v in sizes.values()):
        raise sharding.ShardingError(f"--mesh {_fmt(ici)}: sizes must be positive (one may be -1)")
    if rest:
        if per % known:
            raise sharding.ShardingError(f"--mesh {_fmt(ici)}: {per} devices per {kind} do not divide by {known}")
        sizes[rest[0]] = per // known
    if math.prod(sizes.values()) != per:
        raise sharding.ShardingError(f"--mesh {_fmt(ici)} needs {math.prod(sizes.values())} devices per {kind}, but "
                                     f"each {kind} has {per}; with --dcn-mesh, --mesh describes one {kind}")
    from jax.experimental import mesh_utils

    grid = mesh_utils.create_hybrid_device_mesh(
        [sizes[a] for a in sharding.MESH_AXES], [dcn_sizes[a] for a in sharding.MESH_AXES], devices,
        process_is_granule=kind == "process", allow_split_physical_axes=True)
    return Mesh(grid, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * len(sharding.MESH_AXES))


def _fmt(sizes: Mapping[str, int] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in (sizes or {}).items()) or "''"


# ----------------------------------------------------------------------------------------------------
# Each process's share of a batch
# ----------------------------------------------------------------------------------------------------

def batch_shard(sharding, shape, dim: int):
    """The rows (along `dim`) of a global array of `shape` placed by `sharding` that this process's devices
    hold, as Grain `ShardOptions` (shard `shard_index` of `shard_count` equal, contiguous blocks).

    One process: shard 0 of 1. Processes that replicate the batch get the same shard. A layout whose
    local rows are not one aligned block gives `NoSharding` (this process reads the whole batch and
    `make_array_from_process_local_data` picks its rows): correct, only less economical.
    """
    import grain

    shape = tuple(int(s) for s in shape)
    total = shape[dim]
    blocks = sorted({idx[dim].indices(total)[:2] for idx in sharding.addressable_devices_indices_map(shape).values()})
    lo, hi = blocks[0][0], blocks[-1][1]
    size = hi - lo
    contiguous = all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    if not contiguous or total % size or lo % size:
        return grain.sharding.NoSharding()
    return grain.sharding.ShardOptions(shard_index=lo // size, shard_count=total // size, drop_remainder=True)


def to_host(tree):
    """Global arrays -> numpy on every process (`jax.device_get` for one process; a replicated array's local
    copy, else `multihost_utils.process_allgather`, when other processes hold parts of it)."""
    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


__all__ = ["DistributedOptions", "DistributedError", "parse_options", "initialize", "maybe_initialize",
           "detected_cluster", "is_primary", "make_mesh", "granules", "batch_shard", "to_host"]
