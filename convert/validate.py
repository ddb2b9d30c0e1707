"""Load validation: every checkpoint key placed on a parameter, every shape, FP8 scale and MTP copy checked
from the safetensors headers before any data is read. The plan it returns is what the loader and the
converter fill from."""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
from flax import nnx

from jaxmodels.config import BaseConfig
from jaxmodels.convert.fp8 import BLOCK as FP8_BLOCK
from jaxmodels.convert.keymap import CheckpointError, Placement, export_keys, mtp_layers, mtp_shared_source, place
from jaxmodels.convert.reader import FP8_DTYPE, SAFETENSORS_DTYPE_NAMES, Checkpoint

log = logging.getLogger("jaxmodels.convert")


def _leading_slots(path: tuple[str, ...]) -> int:
    """How many leading axes of a parameter are filled by separate checkpoint tensors."""
    if len(path) > 2 and path[2] == "layers" and path[0] == "model":
        if path[3:6] == ("mlp", "experts", "gate_up_proj"):
            return 3  # layer, expert, gate / up
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
        if dtype != FP8_DTYPE:
            raise CheckpointError(f"{key} is {SAFETENSORS_DTYPE_NAMES.get(dtype, dtype)}; only float8_e4m3fn "
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
    num_mtp = state_mtp_layers(params)
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


def state_mtp_layers(params: dict) -> int:
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


def check_shared_copies(ckpt: Checkpoint, pairs, rows: int = 4096) -> None:
    """Each MTP copy equals its main tensor (compared in row blocks: host memory stays small)."""
    for key, source in pairs:
        a, b = ckpt.slice(key), ckpt.slice(source)
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



def mtp_count(cfg: BaseConfig, ckpt: Checkpoint, mtp: bool | None) -> int:
    """MTP layers to build: those the checkpoint holds (mtp None), none (False), all the config names (True)."""
    if mtp is False:
        return 0
    have = checkpoint_mtp_layers(cfg, ckpt)
    if mtp and (not len(mtp_layers(cfg)) or have < len(mtp_layers(cfg))):
        raise CheckpointError(f"mtp=True but the checkpoint holds {have} of the config's "
                              f"num_nextn_predict_layers={len(mtp_layers(cfg))} MTP layers "
                              f"(keys model.layers.{cfg.num_hidden_layers}.*)")
    return have

