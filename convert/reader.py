"""Reading safetensors checkpoint directories: one file or shards listed by an index, tensors as views of
the files' pages (no copy until a slice is taken), FP8 weights dequantised on read."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any

import jax.numpy as jnp
import ml_dtypes  # registers bfloat16/float8 with numpy, which safetensors' numpy reader needs
import numpy as np
from safetensors import SafetensorError, safe_open

from jaxmodels.config import BaseConfig
from jaxmodels.convert.fp8 import dequantize_fp8
from jaxmodels.convert.keymap import CheckpointError
from jaxmodels.units import DTYPES

# safetensors' numpy reader looks float8 up as a numpy attribute; numpy has none, ml_dtypes does.
if not hasattr(np, "float8_e4m3fn"):
    np.float8_e4m3fn = ml_dtypes.float8_e4m3fn

INDEX_FILE = "model.safetensors.index.json"
FP8_DTYPE = "F8_E4M3"  # safetensors' name for float8_e4m3fn
SAFETENSORS_DTYPE_NAMES = {"F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn", "F8_E8M0": "float8_e8m0fnu"}
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

    def slice(self, key: str):
        """safetensors' lazy slice of tensor `key` (reads only what is indexed)."""
        return self._handle(self.key_file[key]).get_slice(key)

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
        the whole tensor first). FP8 weights come back as stored (float8_e4m3fn); `tensor_view` dequantises."""
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



def read_tensor(ckpt: Checkpoint, key: str) -> np.ndarray:
    """One checkpoint tensor as numpy; FP8 weights come back dequantised to float32 (plan_load has
    checked that each has its scale)."""
    x = ckpt.get(key)
    if x.dtype == ml_dtypes.float8_e4m3fn:
        x = dequantize_fp8(x, ckpt.get(key[: -len("weight")] + "weight_scale_inv"))
    return x


class LazySlice:
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

    def _copy(self) -> "LazySlice":
        new = object.__new__(LazySlice)
        new._sl, new._sel, new._axes = self._sl, list(self._sel), list(self._axes)
        return new

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._sel[a].stop - self._sel[a].start for a in self._axes)

    @property
    def ndim(self) -> int:
        return len(self._axes)

    def swapaxes(self, a: int, b: int) -> "LazySlice":
        new = self._copy()
        a, b = a % self.ndim, b % self.ndim
        new._axes[a], new._axes[b] = new._axes[b], new._axes[a]
        return new

    def __getitem__(self, idx) -> "LazySlice":
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



def tensor_view(ckpt: Checkpoint, key: str) -> np.ndarray:
    """Tensor `key` as stored (a view of the file's pages); FP8 weights dequantised to float32."""
    x = ckpt.array(key)
    if x.dtype == ml_dtypes.float8_e4m3fn:
        x = dequantize_fp8(x, ckpt.array(key[: -len("weight")] + "weight_scale_inv"))
    return x


def default_dtype(cfg: BaseConfig):
    """The checkpoint's own dtype (config.json `dtype`/`torch_dtype`), else float32."""
    raw = dict(cfg.extra)
    return DTYPES.get(str(raw.get("dtype") or raw.get("torch_dtype") or "float32"), jnp.float32)

