"""The streaming loader: a validated checkpoint into a model's parameters, on their devices and shardings,
with host memory bounded by LOAD_WINDOW_BYTES whatever the model size.

The whole key set is placed and validated first (names, shapes, FP8 scales; from the safetensors headers
only, `validate.plan_load`), then each parameter is read in pieces straight from the files' pages by a
thread pool and sent to its devices while earlier pieces are placed.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import threading
import weakref
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxmodels.config import BaseConfig, load_config
from jaxmodels.convert.hub import resolve_checkpoint
from jaxmodels.convert.keymap import CheckpointError, Placement
from jaxmodels.convert.reader import Checkpoint, LazySlice, default_dtype, read_tensor, tensor_view
from jaxmodels.convert.validate import SHARED, check_shared_copies, mtp_count, plan_load
from jaxmodels.model import abstract_model


def _norm_index(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


# Loading is a pipeline of pieces. A piece is one host buffer holding a box of one parameter: the whole
# parameter, one device's block of it on a mesh, or a run of layers (experts) of a block larger than
# PIECE_BYTES. Worker threads fill it straight from the files' pages (Checkpoint.array), converting to the
# parameter dtype in that one copy, and send it to its device in one transfer, while the main thread
# dispatches the device-side work of the pieces before (layout transposes, writes into the block) and
# the next pieces are being read. Host memory stays near LOAD_WINDOW_BYTES (buffers being filled or in
# transfer), whatever the model size.
# Small pieces and the device programs compiled in parallel up front (`_Programs`) make a first load in a
# process about as fast as a second (benchmarks/RESULTS.md, "Loading" and "Figures moved out of the code").
LOAD_WINDOW_BYTES = 2 << 30
PIECE_BYTES = 32 << 20
TASK_BYTES = 64 << 20  # one worker's share of a piece (a piece is filled by several threads at once)
LOAD_THREADS = min(8, os.cpu_count() or 1)
COMPILE_THREADS = min(8, os.cpu_count() or 1)
# The loader's programs only move data: on GPUs, LLVM's cheapest settings compile them faster and they run as
# fast (RESULTS.md, "Figures moved out of the code"; other backends keep their defaults).
LOADER_GPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
FORGIVE_AFTER_S = 2.0  # a sent buffer not freed by then stops counting against the window (_Pipeline.forgive)


class _Part(NamedTuple):
    """One checkpoint tensor's share of a piece: `buf[dest] = value`, where value is
    source[sel] (then .transpose(perm) when perm is set), or transform(source)[index] when the transform
    cannot be followed lazily (sel is None)."""

    key: str
    dest: tuple[int, ...]
    sel: tuple | None
    perm: tuple[int, ...] | None
    transform: Any
    index: tuple | None
    nbytes: int


class _Piece(NamedTuple):
    box: tuple[tuple[int, int], ...]  # [start, stop) per parameter dim
    host_shape: tuple[int, ...]
    axes: tuple[int, ...] | None  # device-side transpose host layout -> parameter layout (None: identity)
    parts: list
    nbytes: int  # host buffer bytes
    credit: int  # parameter bytes it adds (runs may overlap the run before: see _split)


class _Block(NamedTuple):
    box: tuple[tuple[int, int], ...]
    devices: list  # [None]: the default device, uncommitted (no sharding asked for)
    pieces: list


def _split(box, n_lead: int, itemsize: int, limit: int):
    """Boxes of one shape, at most `limit` bytes where cutting the first n_lead dims allows, covering `box`,
    each with the bytes it adds. The last run along the cut dim starts early enough to keep the shape (it
    overlaps the one before), so one compiled write serves every run."""
    ext = [b - a for a, b in box]
    nbytes = math.prod(ext) * itemsize
    if nbytes <= limit or n_lead == 0:
        return [(tuple(box), nbytes)]
    d = 0
    while d < n_lead - 1 and math.prod(ext[d + 1:]) * itemsize > limit:
        d += 1
    one = math.prod(ext[d + 1:]) * itemsize
    most = max(1, min(ext[d], limit // max(one, 1)))
    k = -(-ext[d] // -(-ext[d] // most))  # as many runs as needed, evened out: little overlap
    a, b = box[d]
    starts = list(range(a, b - k + 1, k))
    if starts[-1] + k < b:
        starts.append(b - k)
    out = []
    for outer in itertools.product(*(range(lo, hi) for lo, hi in box[:d])):
        prev = a
        for st in starts:
            out.append((tuple((i, i + 1) for i in outer) + ((st, st + k),) + tuple(box[d + 1:]),
                        (st + k - max(st, prev)) * one))
            prev = st + k
    return out


def _resolve(ckpt: Checkpoint, key: str, pl: Placement, index: tuple):
    """(sel, perm) such that transform(tensor)[index] == tensor[sel].transpose(perm), from the tensor's shape
    alone; None when the transform is not one the lazy view follows (slices, swapaxes)."""
    try:
        lazy = LazySlice(None, key, ckpt.shape(key))
        view = pl.transform(lazy) if pl.transform is not None else lazy
        if not isinstance(view, LazySlice):
            return None
        view = view[index]
    except (TypeError, AttributeError, IndexError):
        return None
    kept = [a for a, s in enumerate(view._sel) if isinstance(s, slice)]
    return tuple(view._sel), tuple(kept.index(a) for a in view._axes)


def _make_piece(ckpt: Checkpoint, entries, box, credit: int, itemsize: int) -> _Piece:
    """The parts of `entries` inside `box`. When every part reads a region of its tensor with the same axis
    order (e.g. all experts [out, in] for an [in, out] parameter), the host buffer keeps the files' order and
    the device transposes the whole piece at once (a host transpose runs at a fraction of memory speed);
    otherwise the host writes the parameter's layout."""
    ext = tuple(b - a for a, b in box)
    found = []
    for key, pl in entries:
        m = len(pl.index)
        if all(box[j][0] <= pl.index[j] < box[j][1] for j in range(m)):
            index = tuple(slice(a, b) for a, b in box[m:])
            found.append((key, pl, m, tuple(pl.index[j] - box[j][0] for j in range(m)), index,
                          _resolve(ckpt, key, pl, index)))
    sigs = {(m, r[1]) if r is not None else None for _, _, m, _, _, r in found}
    parts = []
    if len(sigs) == 1 and None not in sigs:
        (m, perm), = sigs
        raw = [0] * len(perm)
        for j, p in enumerate(perm):
            raw[p] = ext[m + j]
        host_shape = ext[:m] + tuple(raw)
        axes = tuple(range(m)) + tuple(m + p for p in perm)
        axes = None if axes == tuple(range(len(axes))) else axes
        nb = math.prod(raw) * itemsize
        parts = [_Part(key, dest, r[0], None, None, None, nb) for key, _, _, dest, _, r in found]
    else:
        host_shape, axes = ext, None
        for key, pl, m, dest, index, r in found:
            nb = math.prod(ext[m:]) * itemsize
            if r is not None:
                parts.append(_Part(key, dest, r[0], None if r[1] == tuple(range(len(r[1]))) else r[1], None, None,
                                   nb))
            else:
                parts.append(_Part(key, dest, None, None, pl.transform, index, nb))
    return _Piece(tuple(box), host_shape, axes, parts, math.prod(host_shape) * itemsize, credit)


def _plan_blocks(ckpt: Checkpoint, shape: tuple[int, ...], entries, sharding, itemsize: int) -> list[_Block]:
    """The distinct device blocks of one parameter (replicas share one read), each cut into pieces."""
    if sharding is None:
        groups = {tuple((0, n) for n in shape): [None]}
    else:
        groups = defaultdict(list)
        for device, index in sharding.addressable_devices_indices_map(shape).items():
            groups[tuple((s.start, s.stop) for s in _norm_index(index, shape))].append(device)
    n_lead = min(len(pl.index) for _, pl in entries)
    return [_Block(box, devices, [_make_piece(ckpt, entries, b, c, itemsize)
                                  for b, c in _split(box, n_lead, itemsize, PIECE_BYTES)])
            for box, devices in groups.items()]



def _transpose_into(dst: np.ndarray, x: np.ndarray, perm, block: int = 128) -> None:
    """dst[...] = x.transpose(perm), in blocks along dst's last axis so that the source rows being read stay
    in cache (about 2.5x numpy's plain strided copy)."""
    axis = perm[-1]
    for a in range(0, dst.shape[-1], block):
        sel = [slice(None)] * x.ndim
        sel[axis] = slice(a, a + block)
        dst[..., a:a + block] = x[tuple(sel)].transpose(perm)


def _fill(ckpt: Checkpoint, buf: np.ndarray, parts) -> None:
    for part in parts:
        try:
            if part.sel is not None:
                x = tensor_view(ckpt, part.key)[part.sel]
                if part.perm is not None:
                    _transpose_into(buf[part.dest], x, part.perm)
                    continue
            else:  # a transform the lazy view cannot follow: the whole tensor through it
                x = read_tensor(ckpt, part.key)
                x = (part.transform(x) if part.transform is not None else x)[part.index]
            buf[part.dest] = x  # the one copy: file pages -> buffer, in the parameter dtype
        except CheckpointError:
            raise
        except (OSError, ValueError) as e:
            raise CheckpointError(f"could not read {part.key!r} from {ckpt.key_file[part.key]} ({e}); the file is "
                                  "corrupt or truncated, re-download it") from e


class _Pipeline:
    """Fills pieces on a thread pool and sends each to its device, with at most `window` host bytes held
    (a piece larger than the window runs alone)."""

    def __init__(self, ckpt: Checkpoint, window: int, threads: int):
        self.ckpt, self.window = ckpt, window
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="jaxmodels-load")
        self.lock = threading.Condition()
        self.held = 0  # bytes of host buffers alive (released when the buffer is freed, not when it is sent)
        self._alive: dict[int, list] = {}  # piece number -> [bytes, sent]
        self._count = itertools.count()

    def has_room(self, nbytes: int) -> bool:
        with self.lock:
            return self.held == 0 or self.held + nbytes <= self.window

    def wait_for_room(self, nbytes: int, timeout: float) -> bool:
        with self.lock:
            return self.lock.wait_for(lambda: self.held == 0 or self.held + nbytes <= self.window, timeout)

    def _release(self, number: int) -> None:
        with self.lock:
            entry = self._alive.pop(number, None)
            if entry is not None:
                self.held -= entry[0]
                self.lock.notify_all()

    def forgive(self) -> None:
        """Stops counting buffers already sent whose memory the backend still holds: the device owns them
        now. (A safety valve: a backend that kept a sent buffer would otherwise stall the loading; XLA:CPU,
        which adopts numpy buffers, gets a copy instead, see `start`.)"""
        with self.lock:
            for number in [n for n, (_, sent) in self._alive.items() if sent]:
                self.held -= self._alive.pop(number)[0]

    def start(self, piece: _Piece, device, dtype) -> Future:
        """A future of the piece on `device` (host layout); its host bytes are released when it resolves."""
        number = next(self._count)
        with self.lock:
            self.held += piece.nbytes
            self._alive[number] = [piece.nbytes, False]
        done = Future()
        host = [np.empty(piece.host_shape, dtype)]  # dropped once sent
        # Counted until really freed (a transfer may hold the buffer a little after the array is ready).
        weakref.finalize(host[0], self._release, number)
        tasks, current, size = [], [], 0
        for part in piece.parts:
            if current and size + part.nbytes > TASK_BYTES:
                tasks.append(current)
                current, size = [], 0
            current.append(part)
            size += part.nbytes
        tasks.append(current)
        state = {"left": len(tasks), "failed": False}

        def finish(exc=None, value=None):
            done.set_exception(exc) if exc is not None else done.set_result(value)

        def run(parts):
            try:
                _fill(self.ckpt, host[0], parts)
            except BaseException as e:  # noqa: BLE001 (handed to the caller through the future)
                with self.lock:
                    first = not state["failed"]
                    state["failed"] = True
                    state["left"] -= 1
                if first:
                    finish(exc=e)  # (the buffer goes with the last task still running)
                return
            with self.lock:
                state["left"] -= 1
                last = state["left"] == 0 and not state["failed"]
            if last:
                try:
                    value = jax.device_put(host[0]) if device is None else jax.device_put(host[0], device)
                    if next(iter(value.devices())).platform == "cpu":
                        # XLA:CPU adopts a numpy buffer zero-copy for the array's whole life: copy it into
                        # the runtime's own memory so the host buffer is freed now and the window holds.
                        value = jnp.copy(value)
                    value.block_until_ready()  # the transfer is done: the host buffer can go
                except BaseException as e:  # noqa: BLE001
                    host.clear()
                    finish(exc=e)
                    return
                host.clear()
                with self.lock:
                    if number in self._alive:
                        self._alive[number][1] = True
                finish(value=value)

        for parts in tasks:
            self.pool.submit(run, parts)
        return done

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


@functools.partial(jax.jit, static_argnums=1)
def _to_layout(piece, axes):
    return jnp.transpose(piece, axes)


@functools.partial(jax.jit, static_argnums=3, donate_argnums=0)
def _write_piece(buf, piece, offsets, axes):
    """buf with the box at `offsets` replaced by piece (transposed to the parameter layout), in place."""
    if axes is not None:
        piece = jnp.transpose(piece, axes)
    return jax.lax.dynamic_update_slice(buf, piece, offsets)


class _Programs:
    """The load's device-side programs (layout transposes, block buffers, piece writes), compiled on a thread
    pool while the files are being read. Each distinct shape is its own XLA program, and XLA:GPU takes up to
    a second or so to compile one: compiled one after the other on first use, as plain `jit` calls would,
    they cost a model with a dozen distinct shapes seconds of its load; several compile at once (RESULTS.md,
    "Figures moved out of the code")."""

    def __init__(self, threads: int):
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="jaxmodels-compile")
        self.compiled: dict[tuple, Future] = {}

    def _get(self, key: tuple, device, lower) -> Future:
        key = key + (device,)
        if key not in self.compiled:
            opts = LOADER_GPU_COMPILER_OPTIONS if device.platform == "gpu" else None
            self.compiled[key] = self.pool.submit(lambda: lower().compile(opts))
        return self.compiled[key]

    @staticmethod
    def _spec(shape, dtype, device):
        return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=jax.sharding.SingleDeviceSharding(device))

    def layout(self, shape, dtype, axes, device) -> Future:
        return self._get(("layout", tuple(shape), np.dtype(dtype), axes), device,
                         lambda: _to_layout.lower(self._spec(shape, dtype, device), axes))

    def zeros(self, shape, dtype, device) -> Future:
        sharding = jax.sharding.SingleDeviceSharding(device)
        return self._get(("zeros", tuple(shape), np.dtype(dtype)), device,
                         lambda: jax.jit(functools.partial(jnp.zeros, tuple(shape), dtype),
                                         out_shardings=sharding).lower())

    def write(self, shape, piece_shape, dtype, axes, device) -> Future:
        offsets = (np.int32(0),) * len(shape)
        return self._get(("write", tuple(shape), tuple(piece_shape), np.dtype(dtype), axes), device,
                         lambda: _write_piece.lower(self._spec(shape, dtype, device),
                                                    self._spec(piece_shape, dtype, device), offsets, axes))

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)



def load_state(path: str, cfg: BaseConfig, dtype=jnp.float32, *, sharding_fn=None, progress: bool = True,
               mtp: bool | None = None):
    """Reads the checkpoint into the model's nnx State (values placed on device).

    sharding_fn(path, var) -> jax.sharding.Sharding or None: where each parameter goes. mtp: load DeepSeek-V3's
    multi-token-prediction layers — None: those the checkpoint has; False: none; True: required.
    """
    ckpt = Checkpoint(path)
    abstract = abstract_model(cfg, dtype, num_mtp_layers=mtp_count(cfg, ckpt, mtp))
    graphdef, abstract_state = nnx.split(abstract)
    plan = plan_load(cfg, ckpt, abstract_state)
    check_shared_copies(ckpt, plan.pop(SHARED, []))
    items = list(nnx.to_flat_state(abstract_state))
    # Plan every piece first (headers only), so the progress bar knows the bytes and reading never waits.
    params = []
    for p, var in items:
        name = tuple(str(x) for x in p)
        sharding = sharding_fn(name, var) if sharding_fn else None
        blocks = _plan_blocks(ckpt, tuple(var.shape), plan[name], sharding, np.dtype(var.dtype).itemsize)
        params.append((p, var, sharding, blocks))
    total = sum(piece.credit for *_, blocks in params for block in blocks for piece in block.pieces)
    bar = tqdm(total=total, desc="loading", unit="B", unit_scale=True, disable=not progress)
    jobs = [(i, j, k) for i, (*_, blocks) in enumerate(params) for j, block in enumerate(blocks)
            for k in range(len(block.pieces))]
    assembling: dict[tuple[int, int], jax.Array] = {}  # device buffers of blocks sent in several pieces
    ready: dict[int, dict[int, jax.Array]] = defaultdict(dict)  # param -> block -> its array on devices[0]
    values: dict[int, jax.Array] = {}

    default_device = jax.device_put(np.int32(0)).devices().pop()
    programs = _Programs(COMPILE_THREADS)

    def request_programs(var, block) -> tuple:
        """Starts compiling what the block's pieces need on device (see `_Programs`)."""
        device = block.devices[0] or default_device
        shape = tuple(b - a for a, b in block.box)
        if len(block.pieces) == 1:
            piece = block.pieces[0]
            return (programs.layout(piece.host_shape, var.dtype, piece.axes, device),) if piece.axes else ()
        return (programs.zeros(shape, var.dtype, device),) + tuple(
            programs.write(shape, piece.host_shape, var.dtype, piece.axes, device) for piece in block.pieces)

    compiling = {(i, j): request_programs(var, block) for i, (_, var, _, blocks) in enumerate(params)
                 for j, block in enumerate(blocks)}

    def land(i: int, j: int, k: int, piece_on_device: jax.Array) -> None:
        """Dispatches the device-side work of piece k of block j of parameter i (asynchronous)."""
        _, var, sharding, blocks = params[i]
        block = blocks[j]
        piece = block.pieces[k]
        fns = compiling[(i, j)]
        if len(block.pieces) == 1:
            value = fns[0].result()(piece_on_device) if piece.axes is not None else piece_on_device
        else:
            buf = assembling.pop((i, j), None)
            if buf is None:
                buf = fns[0].result()()
            offsets = tuple(np.int32(a - b) for (a, _), (b, _) in zip(piece.box, block.box))
            buf = fns[1 + k].result()(buf, piece_on_device, offsets)
            if k < len(block.pieces) - 1:
                assembling[(i, j)] = buf
                bar.update(piece.credit)
                return
            value = buf
        bar.update(piece.credit)
        ready[i][j] = value
        if len(ready[i]) == len(blocks):
            per_block = ready.pop(i)
            if sharding is None:
                values[i] = per_block[0]
                return
            arrays = []
            for jj, b in enumerate(blocks):
                arrays.append(per_block[jj])
                arrays += [jax.device_put(per_block[jj], d) for d in b.devices[1:]]  # replicas: device to device
            values[i] = jax.make_array_from_single_device_arrays(tuple(var.shape), sharding, arrays)

    pipeline = _Pipeline(ckpt, LOAD_WINDOW_BYTES, LOAD_THREADS)
    pending: deque = deque()
    try:
        for i, j, k in jobs:
            _, var, _, blocks = params[i]
            piece = blocks[j].pieces[k]
            # Hand finished pieces to their devices; wait on the oldest only when the window is full.
            while True:
                if pending and (pending[0][3].done() or not pipeline.has_room(piece.nbytes)):
                    *ijk, fut = pending.popleft()
                    land(*ijk, fut.result())
                elif pipeline.has_room(piece.nbytes):
                    break
                elif not pipeline.wait_for_room(piece.nbytes, timeout=FORGIVE_AFTER_S):  # sent, on their way out
                    pipeline.forgive()
            pending.append((i, j, k, pipeline.start(piece, blocks[j].devices[0], var.dtype)))
        while pending:
            *ijk, fut = pending.popleft()
            land(*ijk, fut.result())
    finally:
        pipeline.close()
        programs.close()
        bar.close()
    flat = [(p, var.replace(value=values[i])) for i, (p, var, _, _) in enumerate(params)]
    return graphdef, nnx.from_flat_state(flat)



def from_pretrained(name_or_path: str, dtype=None, *, mesh=None, progress: bool = True, rules=None,
                    mtp: bool | None = None, options=None):
    """Loads a Hugging Face checkpoint as a jaxmodels model (family from model_type, head from architectures).

    dtype: parameter dtype (default: the checkpoint's config `dtype`/`torch_dtype`, else float32).
    mesh: a jax.sharding.Mesh; parameters are created with their final shardings (see jaxmodels.sharding),
        each device reading only its slices of the files, and the model runs on that mesh.
    rules: overrides of the logical-axis -> mesh-axis table (jaxmodels.sharding.RULES), with `mesh`.
    mtp: DeepSeek-V3 multi-token-prediction layers (jaxmodels.layers.mtp; needed for speculative decoding and
        the MTP loss) — None (default): load those the checkpoint holds; False: skip them; True: require them.
    options: the model's static choices (jaxmodels.options.Options or a dict of its fields: attention kernel,
        remat, compute dtype, scan, ...); `mesh` and `rules`, when given, are set in them.
    """
    path = resolve_checkpoint(name_or_path)
    cfg = load_config(path)
    if dtype is None:
        dtype = default_dtype(cfg)
    sharding_fn = None
    if mesh is not None:
        from jaxmodels.sharding import param_sharding
        sharding_fn = lambda name, var: param_sharding(var, mesh, rules)  # noqa: E731
    graphdef, state = load_state(path, cfg, dtype, sharding_fn=sharding_fn, progress=progress, mtp=mtp)
    placement = {} if mesh is None else {"mesh": mesh}
    if rules is not None:
        placement["rules"] = rules
    return nnx.merge(graphdef, state).with_options(options, **placement)

