"""Hugging Face safetensors checkpoints <-> jaxmodels models.

Loading streams: the whole key set is placed and validated first (names, shapes, FP8 scales; from the
safetensors headers only), then each parameter is filled one layer slice at a time and written into its
device buffer, so host memory stays near one layer's slice of one parameter, never the checkpoint.

Export (`save_pretrained`) writes the hub's layout (per-layer, per-expert keys) into a temporary
directory and moves it into place only when complete. `convert_checkpoint` (the `jaxmodels convert`
command) streams checkpoint -> checkpoint without building the model, e.g. DeepSeek-V3 FP8 -> bf16.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import itertools
import tempfile
import threading
import weakref
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes  # registers bfloat16/float8 with numpy, which safetensors' numpy reader needs
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from jaxmodels.convert.fp8 import BLOCK as FP8_BLOCK
from jaxmodels.convert.fp8 import dequantize_fp8
from jaxmodels.convert.keymap import (CheckpointError, Placement, export_keys, mtp_layers, mtp_shared_exports,
                                      mtp_shared_source, place)
from jaxmodels.config import BaseConfig, load_config
from jaxmodels.layers.linear import LoRAParam
from jaxmodels.units import DTYPES, parse_size
from jaxmodels.model import abstract_model, model_class

log = logging.getLogger("jaxmodels.convert")

# safetensors' numpy reader looks float8 up as a numpy attribute; numpy has none, ml_dtypes does.
if not hasattr(np, "float8_e4m3fn"):
    np.float8_e4m3fn = ml_dtypes.float8_e4m3fn

INDEX_FILE = "model.safetensors.index.json"
_FP8_DTYPE = "F8_E4M3"  # safetensors' name for float8_e4m3fn
_SAFETENSORS_DTYPE_NAMES = {"F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn", "F8_E8M0": "float8_e8m0fnu"}
SINGLE_FILE = "model.safetensors"


class Checkpoint:
    """The tensors of a safetensors checkpoint directory (one file, or shards listed by the index)."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
        index = os.path.join(path, INDEX_FILE)
        single = os.path.join(path, SINGLE_FILE)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e}); re-download it") from e
            self.key_file = {k: os.path.join(path, v) for k, v in weight_map.items()}
            for file in sorted(set(self.key_file.values())):
                if not os.path.exists(file):
                    raise FileNotFoundError(f"{INDEX_FILE} lists {os.path.basename(file)}, which is missing from "
                                            f"{path}; download the complete checkpoint")
        elif os.path.exists(single):
            self.key_file = {k: single for k in self._open(single).keys()}
        else:
            raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}: jaxmodels reads safetensors "
                                    "checkpoints (convert .bin files with transformers' save_pretrained first)")
        self._handles: dict[str, Any] = {}
        self._maps: dict[str, tuple] = {}
        # Validate every shard's header now, and that each indexed key is really in its shard.
        by_file = defaultdict(list)
        for k, f in self.key_file.items():
            by_file[f].append(k)
        for file, keys in by_file.items():
            present = set(self._handle(file).keys())
            missing = [k for k in keys if k not in present]
            if missing:
                raise CheckpointError(f"{os.path.basename(file)} lacks tensors its index promises, e.g. "
                                      f"{missing[:3]}; the shard is stale or truncated, re-download it")

    @staticmethod
    def _open(file: str):
        try:
            return safe_open(file, framework="numpy")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file} is not a readable safetensors file ({e}); it is corrupt or truncated, "
                                  "re-download it") from e

    def _handle(self, file: str):
        if file not in self._handles:
            self._handles[file] = self._open(file)
        return self._handles[file]

    def keys(self) -> list[str]:
        return list(self.key_file)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(self.key_file[key]).get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return self._handle(self.key_file[key]).get_slice(key).get_dtype()

    def array(self, key: str) -> np.ndarray:
        """A read-only view of tensor `key` straight onto the file's pages (np.memmap): slicing it and copying
        the slice into a destination buffer is the only copy a load makes (safetensors' get_tensor copies
        the whole tensor first). FP8 weights come back as stored (float8_e4m3fn); `_source` dequantises."""
        if key not in self.key_file:
            raise CheckpointError(f"tensor {key!r} is missing from the checkpoint at {self.path}")
        file = self.key_file[key]
        if file not in self._maps:
            self._maps[file] = _map_file(file)
        mm, start, header = self._maps[file]
        info = header.get(key)
        dtype = _NUMPY_DTYPES.get(info["dtype"]) if info else None
        if dtype is None:  # a dtype we do not map ourselves: the library's (copying) reader
            return self.get(key)
        a, b = info["data_offsets"]
        return mm[start + a: start + b].view(dtype).reshape(info["shape"])

    def get(self, key: str) -> np.ndarray:
        if key not in self.key_file:
            raise CheckpointError(f"tensor {key!r} is missing from the checkpoint at {self.path}")
        file = self.key_file[key]
        try:
            return self._handle(file).get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"could not read {key!r} from {file} ({e}); the file is corrupt or truncated, "
                                  "re-download it") from e


_NUMPY_DTYPES = {"BOOL": np.dtype(bool), "U8": np.dtype("<u1"), "I8": np.dtype("<i1"), "I16": np.dtype("<i2"),
                 "U16": np.dtype("<u2"), "I32": np.dtype("<i4"), "U32": np.dtype("<u4"), "I64": np.dtype("<i8"),
                 "U64": np.dtype("<u8"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"),
                 "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
                 "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2)}


def _map_file(file: str) -> tuple[np.ndarray, int, dict]:
    """(the file as a read-only uint8 memmap, where its data starts, its header). safe_open has already
    validated the header and that the data fits the file (Checkpoint opens every shard first)."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    size = os.path.getsize(file)
    mm = np.memmap(file, dtype=np.uint8, mode="r") if size > 8 + n else np.zeros(8 + n, np.uint8)
    return mm, 8 + n, header


def _leading_slots(path: tuple[str, ...]) -> int:
    """How many leading axes of a parameter are filled by separate checkpoint tensors."""
    if len(path) > 2 and path[2] == "layers" and path[0] == "model":
        if path[3:5] == ("mlp", "experts") or path[-2] in ("q_layernorm", "k_layernorm"):
            return 2
        return 1
    return 0


def _check_fp8(ckpt: Checkpoint, key: str) -> None:
    """A float8 weight needs its 128x128-block `weight_scale_inv`, and a scale needs a float8 weight
    (checked from the headers, before any data is read)."""
    dtype = ckpt.dtype(key)
    scale_key = key[: -len("weight")] + "weight_scale_inv" if key.endswith("weight") else None
    has_scale = scale_key is not None and scale_key in ckpt.key_file
    if dtype.startswith("F8"):
        if dtype != _FP8_DTYPE:
            raise CheckpointError(f"{key} is {_SAFETENSORS_DTYPE_NAMES.get(dtype, dtype)}; only float8_e4m3fn "
                                  "(DeepSeek-V3's FP8 format) with 128x128 weight_scale_inv blocks can be dequantised")
        if not has_scale:
            raise CheckpointError(f"{key} is float8 but {scale_key} is missing; the FP8 checkpoint is incomplete, "
                                  "re-download it")
        shape, scale = ckpt.shape(key), ckpt.shape(scale_key)
        want = tuple(-(-d // FP8_BLOCK) for d in shape)
        if len(shape) != 2 or scale != want:
            raise CheckpointError(f"{scale_key} has shape {scale} but {key} {shape} needs {want} "
                                  f"({FP8_BLOCK}x{FP8_BLOCK} blocks); the FP8 checkpoint is corrupt")
    elif has_scale:
        raise CheckpointError(f"{scale_key} is present but {key} is {dtype}, not float8; the checkpoint mixes "
                              "quantised and dequantised files, re-download it")


def plan_load(cfg: BaseConfig, ckpt: Checkpoint, abstract_state) -> dict:
    """Validates names and shapes before any data is read: {param path: [(key, Placement), ...]}."""
    params = {tuple(str(p) for p in path): var for path, var in nnx.to_flat_state(abstract_state)}
    keys = ckpt.keys()
    scale_keys = {k for k in keys if k.endswith(".weight_scale_inv")}
    plan: dict[tuple[str, ...], list[tuple[str, Placement]]] = defaultdict(list)
    num_mtp = _num_mtp(params)
    skipped_layers = set()
    for key in keys:
        if key in scale_keys:
            if key[: -len("_scale_inv")] not in ckpt.key_file:
                raise CheckpointError(f"{key} has no matching weight tensor in the checkpoint; the FP8 checkpoint "
                                      "is incomplete, re-download it")
            continue
        placements = place(cfg, key, num_mtp)
        if placements is None:
            source = mtp_shared_source(cfg, key)
            if source is not None and int(key.split(".")[2]) - cfg.num_hidden_layers < num_mtp:
                # A copy of the embedding / head the MTP layer shares with the main model (checked at load).
                if source not in ckpt.key_file or ckpt.shape(source) != ckpt.shape(key):
                    raise CheckpointError(f"{key} {ckpt.shape(key)} should be a copy of {source} (DeepSeek's MTP "
                                          "shares the main embedding and head), which the checkpoint "
                                          + ("lacks" if source not in ckpt.key_file else
                                             f"has with shape {ckpt.shape(source)}"))
                plan[SHARED].append((key, source))
            elif key.startswith("model.layers."):
                skipped_layers.add(int(key.split(".")[2]))
            continue
        _check_fp8(ckpt, key)
        for pl in placements:
            if pl.path not in params:
                raise CheckpointError(
                    f"unexpected tensor {key!r}: this {cfg.model_type} model ({type(cfg).__name__}, head "
                    f"{cfg.head}) has no parameter for it; check that config.json matches the weights")
            plan[pl.path].append((key, pl))
    if skipped_layers:
        assert skipped_layers <= set(mtp_layers(cfg))  # place() refuses any other layer beyond the config
        log.info("skipping checkpoint layer(s) %s: DeepSeek multi-token-prediction modules (layers >= "
                 "num_hidden_layers=%d), not loaded (from_pretrained(..., mtp=False))", sorted(skipped_layers),
                 cfg.num_hidden_layers)
    for d in range(num_mtp):
        for k in (f"model.layers.{cfg.num_hidden_layers + d}.{n}" for n in ("embed_tokens.weight",
                                                                             "shared_head.head.weight")):
            if k not in ckpt.key_file:
                raise CheckpointError(f"the checkpoint has no tensor {k!r}: MTP layer {d} is incomplete; load "
                                      "without the MTP layers (mtp=False) or use a complete checkpoint")
    for path, var in params.items():
        entries = plan.get(path)
        name = ".".join(path)
        if not entries:
            want = [k for k, _, _ in export_keys(cfg, path, var.shape)]
            raise CheckpointError(f"the checkpoint has no tensor {_few(want)} for parameter {name} (shape "
                                  f"{var.shape}); the checkpoint is incomplete or config.json does not match it")
        slots = _leading_slots(path)
        filled = np.zeros(var.shape[:slots], dtype=bool)
        for key, pl in entries:
            # Check the shape this tensor will have after its transform.
            src = ckpt.shape(key)
            if pl.transform is not None:
                # A zero-stride view: transforms (slices, swapaxes) run on it without allocating anything.
                probe = np.broadcast_to(np.False_, src) if len(src) >= 2 else None
                src = pl.transform(probe).shape if probe is not None else src
            want = var.shape[len(pl.index):]
            if tuple(src) != tuple(want):
                raise CheckpointError(f"shape mismatch for {key!r}: checkpoint has {ckpt.shape(key)}, the model "
                                      f"expects {tuple(want)} (after layout change) for {name}; check config.json")
            if filled[pl.index].any():
                other = next(k for k, o in entries if o is not pl and
                             o.index[: len(pl.index)] == pl.index[: len(o.index)])
                raise CheckpointError(f"tensors {key!r} and {other!r} overlap (both fill {name}{list(pl.index)}); "
                                      "a checkpoint holds per-expert or fused expert tensors, not both")
            filled[pl.index] = True
        if not filled.all():
            missing = [k for k, index, _ in export_keys(cfg, path, var.shape) if not filled[index]]
            raise CheckpointError(f"the checkpoint is missing tensor {_few(missing)} (part of {name}); the checkpoint "
                                  "is incomplete or config.json does not match it")
    return plan


SHARED = ("<mtp shared copies>",)  # plan entry: [(MTP copy key, main key it must equal)]


def _num_mtp(params: dict) -> int:
    """MTP depths of an abstract model state (leading axis of its `model.mtp_layers` parameters)."""
    for path, var in params.items():
        if path[:2] == ("model", "mtp_layers"):
            return var.shape[0]
    return 0


def checkpoint_mtp_layers(cfg: BaseConfig, ckpt: Checkpoint) -> int:
    """How many MTP layers (`model.layers.{num_hidden_layers + d}.*`, d = 0, 1, ...) the checkpoint holds."""
    present = {int(k.split(".")[2]) for k in ckpt.keys() if k.startswith("model.layers.")}
    n = 0
    while cfg.num_hidden_layers + n in present and cfg.num_hidden_layers + n in mtp_layers(cfg):
        n += 1
    return n


def _check_shared_copies(ckpt: Checkpoint, pairs, rows: int = 4096) -> None:
    """Each MTP copy equals its main tensor (compared in row blocks: host memory stays small)."""
    for key, source in pairs:
        a, b = ckpt._handle(ckpt.key_file[key]).get_slice(key), ckpt._handle(ckpt.key_file[source]).get_slice(source)
        n = ckpt.shape(key)[0]
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            if not np.array_equal(a[start:stop], b[start:stop]):
                raise CheckpointError(f"{key} differs from {source}: jaxmodels' MTP shares the main embedding and "
                                      "head (as DeepSeek-V3 trains it), so it cannot load a separate MTP copy; load "
                                      "without the MTP layers (mtp=False)")


def _few(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _read(ckpt: Checkpoint, key: str) -> np.ndarray:
    """One checkpoint tensor as numpy; FP8 weights come back dequantised to float32 (plan_load has
    checked that each has its scale)."""
    x = ckpt.get(key)
    if x.dtype == ml_dtypes.float8_e4m3fn:
        x = dequantize_fp8(x, ckpt.get(key[: -len("weight")] + "weight_scale_inv"))
    return x


class _LazySlice:
    """A view of one safetensors tensor that reads nothing until `read()`.

    It supports what the key map's layout transforms do (np.swapaxes, basic slicing), so the loader can
    apply a transform first and then cut out one device's block: only that block is read from the file.
    """

    def __init__(self, handle, key: str, shape: tuple[int, ...] | None = None):
        # With `shape` (no handle): a view that only records the selection (the loader reads it itself).
        self._sl = handle.get_slice(key) if handle is not None else None
        shape = self._sl.get_shape() if shape is None else shape
        self._sel: list = [slice(0, n) for n in shape]  # per source axis: slice or int
        self._axes = list(range(len(self._sel)))  # view dimension -> source axis

    def _copy(self) -> "_LazySlice":
        new = object.__new__(_LazySlice)
        new._sl, new._sel, new._axes = self._sl, list(self._sel), list(self._axes)
        return new

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._sel[a].stop - self._sel[a].start for a in self._axes)

    @property
    def ndim(self) -> int:
        return len(self._axes)

    def swapaxes(self, a: int, b: int) -> "_LazySlice":
        new = self._copy()
        a, b = a % self.ndim, b % self.ndim
        new._axes[a], new._axes[b] = new._axes[b], new._axes[a]
        return new

    def __getitem__(self, idx) -> "_LazySlice":
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(i is Ellipsis for i in idx):
            at = idx.index(Ellipsis)
            idx = idx[:at] + (slice(None),) * (self.ndim - len(idx) + 1) + idx[at + 1:]
        if len(idx) > self.ndim:
            raise IndexError(f"too many indices for a {self.ndim}-d tensor")
        new, keep = self._copy(), []
        for v, a in enumerate(self._axes):
            cur = self._sel[a]
            n = cur.stop - cur.start
            i = idx[v] if v < len(idx) else slice(None)
            if isinstance(i, slice):
                start, stop, step = i.indices(n)
                if step != 1:
                    raise TypeError("strided slices are not supported lazily")
                new._sel[a] = slice(cur.start + start, cur.start + max(stop, start))
                keep.append(a)
            elif isinstance(i, (int, np.integer)):
                i = int(i) + (n if int(i) < 0 else 0)
                if not 0 <= i < n:
                    raise IndexError(f"index {int(idx[v])} out of range for size {n}")
                new._sel[a] = cur.start + i
            else:
                raise TypeError(f"index {i!r} is not supported lazily")
        new._axes = keep
        return new

    def read(self) -> np.ndarray:
        sel = tuple(s if isinstance(s, slice) else slice(s, s + 1) for s in self._sel)
        remaining = [a for a, s in enumerate(self._sel) if isinstance(s, slice)]
        x = self._sl[sel].reshape([self._sel[a].stop - self._sel[a].start for a in remaining])
        return x.transpose([remaining.index(a) for a in self._axes])


def _read_block(ckpt: Checkpoint, key: str, pl: Placement, index: tuple) -> np.ndarray:
    """The block `index` (slices over the parameter's trailing dims) of checkpoint tensor `key` after its
    layout transform, reading only that block where the transform allows (else the one whole tensor).
    (The loader does the same through `_resolve`, into its own buffers.)"""
    r = _resolve(ckpt, key, pl, index)
    if r is not None:
        sel, perm = r
        return np.ascontiguousarray(_source(ckpt, key)[sel].transpose(perm))
    x = _read(ckpt, key)
    if pl.transform is not None:
        x = pl.transform(x)
    return np.ascontiguousarray(x[index])


def _norm_index(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


# Loading is a pipeline of pieces. A piece is one host buffer holding a box of one parameter: the whole
# parameter, one device's block of it on a mesh, or a run of layers (experts) of a block larger than
# PIECE_BYTES. Worker threads fill it straight from the files' pages (Checkpoint.array), converting to the
# parameter dtype in that one copy, and send it to its device in one transfer, while the main thread
# dispatches the device-side work of the pieces before (layout transposes, writes into the block) and
# the next pieces are being read. Host memory stays near LOAD_WINDOW_BYTES (buffers being filled or in
# transfer), whatever the model size.
#
# Measured on H100 / H200 hosts (benchmarks/RESULTS.md, 2026-11-23 21:3x-22:0x UTC): with 1 GB pieces the first
# load in a process took 2.6-4.3 s for stablelm-3b (5.6 GB), a second one 0.6 s: the first 1 GB transfers
# took ~0.9 s each, and the device-side programs, compiled one after the other on first use, 0.3-1.3 s
# each. 32 MB pieces and the programs compiled in parallel up front (`_Programs`) load it in 1.2-1.4 s.
LOAD_WINDOW_BYTES = 2 << 30
PIECE_BYTES = 32 << 20
TASK_BYTES = 64 << 20  # one worker's share of a piece (a piece is filled by several threads at once)
LOAD_THREADS = min(8, os.cpu_count() or 1)
COMPILE_THREADS = min(8, os.cpu_count() or 1)
# The loader's programs only move data: on GPUs, LLVM's cheapest settings compile them ~30% faster and they
# run as fast (measured on an H200; other backends keep their defaults).
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
        lazy = _LazySlice(None, key, ckpt.shape(key))
        view = pl.transform(lazy) if pl.transform is not None else lazy
        if not isinstance(view, _LazySlice):
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


def _source(ckpt: Checkpoint, key: str) -> np.ndarray:
    """Tensor `key` as stored (a view of the file's pages); FP8 weights dequantised to float32."""
    x = ckpt.array(key)
    if x.dtype == ml_dtypes.float8_e4m3fn:
        x = dequantize_fp8(x, ckpt.array(key[: -len("weight")] + "weight_scale_inv"))
    return x


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
                x = _source(ckpt, part.key)[part.sel]
                if part.perm is not None:
                    _transpose_into(buf[part.dest], x, part.perm)
                    continue
            else:  # a transform the lazy view cannot follow: the whole tensor through it
                x = _read(ckpt, part.key)
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
    pool while the files are being read. Each distinct shape is its own XLA program, and XLA:GPU took
    0.3-1.3 s to compile one (an H100/H200 host; the transposing writes of expert pieces the longest):
    compiled one after the other on first use, as plain `jit` calls would, they cost a model with a dozen
    distinct shapes seconds of its load. Several compile at once (4 transposes: 1.64 s one after the other,
    0.37 s on 4 threads)."""

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


def _mtp_count(cfg: BaseConfig, ckpt: Checkpoint, mtp: bool | None) -> int:
    """MTP layers to build: those the checkpoint holds (mtp None), none (False), all the config names (True)."""
    if mtp is False:
        return 0
    have = checkpoint_mtp_layers(cfg, ckpt)
    if mtp and (not len(mtp_layers(cfg)) or have < len(mtp_layers(cfg))):
        raise CheckpointError(f"mtp=True but the checkpoint holds {have} of the config's "
                              f"num_nextn_predict_layers={len(mtp_layers(cfg))} MTP layers "
                              f"(keys model.layers.{cfg.num_hidden_layers}.*)")
    return have


def load_state(path: str, cfg: BaseConfig, dtype=jnp.float32, *, sharding_fn=None, progress: bool = True,
               mtp: bool | None = None):
    """Reads the checkpoint into the model's nnx State (values placed on device).

    sharding_fn(path, var) -> jax.sharding.Sharding or None: where each parameter goes. mtp: load DeepSeek-V3's
    multi-token-prediction layers — None: those the checkpoint has; False: none; True: required.
    """
    ckpt = Checkpoint(path)
    abstract = abstract_model(cfg, dtype, num_mtp_layers=_mtp_count(cfg, ckpt, mtp))
    graphdef, abstract_state = nnx.split(abstract)
    plan = plan_load(cfg, ckpt, abstract_state)
    _check_shared_copies(ckpt, plan.pop(SHARED, []))
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


def _default_dtype(cfg: BaseConfig):
    """The checkpoint's own dtype (config.json `dtype`/`torch_dtype`), else float32."""
    raw = dict(cfg.extra)
    return DTYPES.get(str(raw.get("dtype") or raw.get("torch_dtype") or "float32"), jnp.float32)


def resolve_checkpoint(name_or_path: str) -> str:
    """A local directory, or a hub repo id downloaded with huggingface_hub (when online)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path):
        raise FileNotFoundError(f"{name_or_path!r} is a file; pass the checkpoint directory that holds config.json")
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download
            return snapshot_download(name_or_path,
                                     allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"])
        except Exception as e:  # offline, unknown repo, gated repo ...
            raise FileNotFoundError(f"{name_or_path!r} is not a local directory and could not be downloaded from "
                                    f"the Hugging Face hub ({type(e).__name__}: {e})") from e
    raise FileNotFoundError(f"checkpoint directory {name_or_path!r} does not exist")


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
        dtype = _default_dtype(cfg)
    sharding_fn = None
    if mesh is not None:
        from jaxmodels.sharding import param_sharding
        sharding_fn = lambda name, var: param_sharding(var, mesh, rules)  # noqa: E731
    graphdef, state = load_state(path, cfg, dtype, sharding_fn=sharding_fn, progress=progress, mtp=mtp)
    placement = {} if mesh is None else {"mesh": mesh}
    if rules is not None:
        placement["rules"] = rules
    return nnx.merge(graphdef, state).with_options(options, **placement)


_HEAD_ARCH = {"causal_lm": "ForCausalLM", "sequence_classification": "ForSequenceClassification",
              "token_classification": "ForTokenClassification", "base": "ForCausalLM"}


def export_config(cfg: BaseConfig, head: str, dtype) -> dict[str, Any]:
    """config.json of an exported checkpoint: the head it really has, its parameter dtype, and no
    quantization_config (weights are written dequantised)."""
    hf = cfg.to_hf()
    hf.pop("quantization_config", None)
    hf.pop("torch_dtype", None)
    hf["dtype"] = np.dtype(dtype).name
    hf["architectures"] = [cfg.hf_class_prefix + _HEAD_ARCH[head]]
    return hf


class _HostSlices:
    """Fetches a parameter to the host one layer slice at a time, so exporting per-expert keys costs
    one device->host copy per layer (not one per expert) and host memory stays near one layer."""

    def __init__(self):
        self._key, self._host = None, None

    def get(self, value: jax.Array, index: tuple[int, ...]) -> np.ndarray:
        if not index:
            return np.asarray(jax.device_get(value))
        key = (id(value), index[0])
        if self._key != key:
            self._key, self._host = None, None  # drop the previous slice before fetching the next
            self._host = np.asarray(jax.device_get(value[index[0]]))
            self._key = key
        return self._host[index[1:]]


def _write_checkpoint(out_dir: str, entries: list, config: dict[str, Any], max_shard_size: int | str,
                      progress: bool) -> int:
    """Writes `entries` [(hf_key, nbytes, fetch)] (fetch() -> the tensor in HF layout, called once, in
    order) as safetensors shards plus config.json (and the index when sharded). Returns the file count.

    Shards are filled in order up to `max_shard_size` (a tensor larger than that gets a shard of its own).
    Everything is written to a temporary directory inside out_dir and moved into place only once complete,
    so a failure leaves the checkpoint out_dir held before intact (and no temporary files)."""
    max_shard_size = parse_size(max_shard_size, "max_shard_size")
    shards, current, current_size = [], [], 0
    for entry in entries:
        if current and current_size + entry[1] > max_shard_size:
            shards.append(current)
            current, current_size = [], 0
        current.append(entry)
        current_size += entry[1]
    if current or not shards:
        shards.append(current)
    sharded = len(shards) > 1
    names = ([f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))] if sharded
             else [SINGLE_FILE])
    created = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".jaxmodels-save-", dir=out_dir)
    bar = tqdm(total=len(entries), desc="writing", unit="tensor", disable=not progress)
    try:
        weight_map = {}
        for shard, fname in zip(shards, names):
            tensors = {}
            for key, _, fetch in shard:
                tensors[key] = np.ascontiguousarray(fetch())
                weight_map[key] = fname
                bar.update()
            save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
            del tensors
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        if sharded:
            with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                total = int(sum(n for _, n, _ in entries))
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        # Everything is written: move it in (each rename is atomic; config and index last), then drop the
        # previous checkpoint's files that the new one does not overwrite.
        for fname in names + ["config.json"] + ([INDEX_FILE] if sharded else []):
            os.replace(os.path.join(tmp, fname), os.path.join(out_dir, fname))
        for old in os.listdir(out_dir):
            if (old.endswith(".safetensors") and old not in names) or (old == INDEX_FILE and not sharded):
                os.remove(os.path.join(out_dir, old))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # (also in finally; first, so out_dir can be removed)
        if created and not os.listdir(out_dir):
            os.rmdir(out_dir)
        raise
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %d tensors in %d file(s) to %s", len(entries), len(shards), out_dir)
    return len(names)


def save_pretrained(model, out_dir: str, *, max_shard_size: int | str = "5GB", progress: bool = True) -> str:
    """Writes `model` as a Hugging Face checkpoint transformers loads: config.json and safetensors in the
    hub's layout (per-layer, per-expert keys, [out, in] weights), sharded with model.safetensors.index.json
    when larger than `max_shard_size` (bytes, or a string such as "5GB").

    Files are written to a temporary directory inside out_dir and moved into place only once all of them
    are complete, so a save that fails leaves whatever checkpoint out_dir held before intact. Returns out_dir.
    """
    out_dir = os.fspath(out_dir)
    if jax.tree.leaves(nnx.state(model, LoRAParam)):
        raise CheckpointError("the model holds LoRA adapters, which an HF checkpoint has no place for: fold them in "
                              "with jaxmodels.train.lora.merge_lora(model) first, or write them as a PEFT adapter "
                              "with save_adapter")
    cfg: BaseConfig = model.config
    host = _HostSlices()
    entries = []
    for p, var in nnx.to_flat_state(nnx.state(model)):  # every variable load_state fills (Params, Buffers)
        name = tuple(str(x) for x in p)
        value = var.get_value()
        for key, index, transform in export_keys(cfg, name, value.shape):
            def fetch(value=value, index=index, transform=transform):
                x = host.get(value, index)
                return transform(x) if transform else x
            entries.append((key, math.prod(value.shape[len(index):]) * value.dtype.itemsize, fetch))
    # The MTP layers' copies of the shared embedding and head, as the hub layout stores them.
    state = dict((tuple(str(x) for x in p), v) for p, v in nnx.to_flat_state(nnx.state(model)))
    num_mtp = _num_mtp(state)
    for key, src in mtp_shared_exports(cfg, num_mtp):
        value = state[src].get_value()
        entries.append((key, value.size * value.dtype.itemsize, lambda value=value: host.get(value, ())))
    config = export_config(cfg, model.head, model.model.embed_tokens.weight.dtype)
    _write_checkpoint(out_dir, entries, config, max_shard_size, progress)
    return out_dir


class _SourceTensors:
    """The last checkpoint tensor read, after its placement transform (model layout), so the per-expert
    or per-layer exports cut from one fused source tensor read it once."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt, self._key, self._value = ckpt, None, None

    def get(self, key: str, pl: Placement) -> np.ndarray:
        if self._key != (key, pl.path):
            self._key, self._value = None, None
            x = _read(self.ckpt, key)
            self._value = pl.transform(x) if pl.transform is not None else x
            self._key = (key, pl.path)
        return self._value


def convert_checkpoint(name_or_path: str, out_dir: str, dtype=None, *, max_shard_size: int | str = "5GB",
                       progress: bool = True, mtp: bool | None = None) -> str:
    """Rewrites a Hugging Face checkpoint in `dtype` (e.g. DeepSeek-V3 FP8 -> bfloat16) without building
    the model: the checkpoint is validated exactly as `from_pretrained` validates it (every name, shape,
    FP8 scale; MTP layers kept unless mtp=False), then streamed tensor by tensor into new shards, so host memory stays
    near one shard whatever the model size. The result is what `save_pretrained(from_pretrained(...))`
    writes, tensor for tensor. Returns out_dir."""
    path = resolve_checkpoint(os.fspath(name_or_path))
    out_dir = os.fspath(out_dir)
    cfg = load_config(path)
    dtype = _default_dtype(cfg) if dtype is None else dtype
    ckpt = Checkpoint(path)
    abstract = abstract_model(cfg, dtype, num_mtp_layers=_mtp_count(cfg, ckpt, mtp))
    _, abstract_state = nnx.split(abstract)
    plan = plan_load(cfg, ckpt, abstract_state)
    _check_shared_copies(ckpt, plan.pop(SHARED, []))
    source = _SourceTensors(ckpt)
    entries = []
    for p, var in nnx.to_flat_state(abstract_state):
        name = tuple(str(x) for x in p)
        by_index = {pl.index: (key, pl) for key, pl in plan[name]}
        for hf_key, index, transform in export_keys(cfg, name, var.shape):
            # The source tensor that holds this slice: per-expert (index (layer, expert)), or a fused
            # tensor of the whole layer (index (layer,)) to cut the expert from.
            n = next(n for n in range(len(index), -1, -1) if index[:n] in by_index)
            key, pl = by_index[index[:n]]

            def fetch(key=key, pl=pl, rest=index[n:], transform=transform, target=var.dtype):
                x = source.get(key, pl)[rest].astype(target)
                return transform(x) if transform else x
            entries.append((hf_key, math.prod(var.shape[len(index):]) * np.dtype(var.dtype).itemsize, fetch))
    shapes = {tuple(str(x) for x in p): var for p, var in nnx.to_flat_state(abstract_state)}
    for hf_key, src in mtp_shared_exports(cfg, _num_mtp(shapes)):
        (key, pl), = plan[src]
        var = shapes[src]

        def fetch(key=key, pl=pl, target=var.dtype):
            return source.get(key, pl).astype(target)
        entries.append((hf_key, math.prod(var.shape) * np.dtype(var.dtype).itemsize, fetch))
    head = model_class(cfg).head
    _write_checkpoint(out_dir, entries, export_config(cfg, head, abstract.model.embed_tokens.weight.dtype),
                      max_shard_size, progress)
    return out_dir
