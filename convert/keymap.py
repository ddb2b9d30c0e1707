"""Where each Hugging Face checkpoint tensor goes in a jaxmodels parameter tree, and back.

jaxmodels keeps transformers' parameter names, so the map lists only the exceptions:
* `model.layers.{i}.*` -> a layer stack with a leading `layers` axis (DeepSeek: `dense_layers` for
  i < first_k_dense_replace, `moe_layers` after; StableLM: `layers`);
* routed experts are stacked on an `experts` axis: gate and up fused as `gate_up_proj` [E, 2, inter, hidden]
  (each [out, in], as the checkpoint stores it: no transpose), down as `down_proj` [E, inter, hidden] ([in, out]
  for `ragged_dot`), from the hub's per-expert keys (`mlp.experts.{e}.gate_proj.weight`, [out, in]) or
  transformers' fused tensors (`mlp.experts.gate_up_proj` [E, 2*inter, hidden], gate rows first,
  `mlp.experts.down_proj` [E, hidden, inter]);
* StableLM's per-head q/k norms `self_attn.q_layernorm.norms.{h}.weight` stack on a heads axis;
* DeepSeek-V3's multi-token-prediction layers `model.layers.{num_hidden_layers + d}.*` -> the stack
  `model.mtp_layers` (index d), when the model was built with them; their `embed_tokens` and
  `shared_head.head` are copies of the main embedding and head, which the model shares
  (`mtp_shared_source` names the main tensor each must equal; export writes the copies back).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from jaxmodels.config import BaseConfig
from jaxmodels.model import stack_layout


class CheckpointError(ValueError):
    """A checkpoint that does not match the model (the message names the tensor and the fix)."""


@dataclass(frozen=True)
class Placement:
    """One source tensor's destination: parameter path, index into its leading slot dims, transform."""

    path: tuple[str, ...]
    index: tuple[int, ...]
    transform: Callable[[np.ndarray], np.ndarray] | None = None


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_HEAD_NORM = re.compile(r"^self_attn\.(q_layernorm|k_layernorm)\.norms\.(\d+)\.weight$")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _transpose(x):
    return np.swapaxes(x, -1, -2)


_GATE_UP = ("gate_proj", "up_proj")  # the order of `gate_up_proj`'s second axis


def _split_gate_up(x):
    """transformers' fused [E, 2 * inter, hidden] (gate rows, then up rows) as [E, 2, inter, hidden]."""
    return x.reshape(x.shape[0], 2, x.shape[1] // 2, x.shape[2])


def layer_stack(cfg: BaseConfig, layer: int) -> tuple[str, int]:
    """Global (main) layer index -> (stack attribute, index inside the stack), by the decoder's layout."""
    for name, (offset, n) in stack_layout(cfg).items():
        if offset <= layer < offset + n:
            return name, layer - offset
    raise CheckpointError(f"layer {layer} is beyond num_hidden_layers={cfg.num_hidden_layers}")


def stack_offset(cfg: BaseConfig, stack: str) -> int:
    """Checkpoint index of the first layer of stack `stack` (the decoder's layout)."""
    return stack_layout(cfg, max(1, len(mtp_layers(cfg))))[stack][0]


def mtp_layers(cfg: BaseConfig) -> range:
    """Checkpoint layer indices that may hold DeepSeek-V3's multi-token-prediction modules (config
    `num_nextn_predict_layers`). Empty for families without MTP."""
    n = getattr(cfg, "num_nextn_predict_layers", 0) or 0
    return range(cfg.num_hidden_layers, cfg.num_hidden_layers + n)


# MTP tensors that are copies of main-model tensors (the model shares them: jaxmodels.layers.mtp).
MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")


def mtp_shared_source(cfg: BaseConfig, key: str) -> str | None:
    """For an MTP layer's `embed_tokens` / `shared_head.head`: the main checkpoint key it must equal."""
    m = _LAYER.match(key)
    if not m or int(m.group(1)) not in mtp_layers(cfg) or m.group(2) not in MTP_SHARED:
        return None
    if m.group(2) == "embed_tokens.weight" or cfg.tie_word_embeddings:
        return "model.embed_tokens.weight"
    return "lm_head.weight"


def mtp_shared_exports(cfg: BaseConfig, num_mtp: int) -> list[tuple[str, tuple[str, ...]]]:
    """(hf key, source parameter path) of the shared copies export writes for `num_mtp` MTP layers."""
    head = ("model", "embed_tokens", "weight") if cfg.tie_word_embeddings else ("lm_head", "weight")
    out = []
    for d in range(num_mtp):
        prefix = f"model.layers.{cfg.num_hidden_layers + d}."
        out += [(prefix + "embed_tokens.weight", ("model", "embed_tokens", "weight")),
                (prefix + "shared_head.head.weight", head)]
    return out


def place(cfg: BaseConfig, key: str, num_mtp: int = 0) -> list[Placement] | None:
    """Destinations of checkpoint tensor `key`; None if it is deliberately skipped (buffers, MTP layers
    beyond the model's `num_mtp` (when the model is built without them), and MTP copies of the shared
    embedding / head, which `mtp_shared_source` checks instead).

    Raises CheckpointError for a key that has no place in this model.
    """
    if key.endswith(_IGNORED_SUFFIXES):
        return None
    m = _LAYER.match(key)
    if not m:
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            return None  # tied: the output projection is the embedding
        return [Placement(tuple(key.split(".")), ())]
    layer, rest = int(m.group(1)), m.group(2)
    if layer in mtp_layers(cfg):
        if layer - cfg.num_hidden_layers >= num_mtp or rest in MTP_SHARED:
            return None  # not loaded (a model built without MTP), or a copy of the shared embedding / head
        stack, i = "mtp_layers", layer - cfg.num_hidden_layers
    elif layer >= cfg.num_hidden_layers:
        raise CheckpointError(
            f"unexpected tensor {key!r}: layer {layer} is beyond num_hidden_layers={cfg.num_hidden_layers}"
            + (f" (+ num_nextn_predict_layers={len(mtp_layers(cfg))} MTP layers)" if hasattr(
                cfg, "num_nextn_predict_layers") else "")
            + "; check that config.json matches the weights")
    else:
        stack, i = layer_stack(cfg, layer)
    base = ("model", stack, "layers")
    if (e := _EXPERT.match(rest)):
        expert, proj = int(e.group(1)), e.group(2)
        if proj == "down_proj":
            return [Placement(base + ("mlp", "experts", "down_proj"), (i, expert), _transpose)]
        return [Placement(base + ("mlp", "experts", "gate_up_proj"), (i, expert, _GATE_UP.index(proj)))]
    if rest == "mlp.experts.gate_up_proj":  # [E, 2 * inter, hidden] -> [E, 2, inter, hidden] (a view)
        return [Placement(base + ("mlp", "experts", "gate_up_proj"), (i,), _split_gate_up)]
    if rest == "mlp.experts.down_proj":
        return [Placement(base + ("mlp", "experts", "down_proj"), (i,), _transpose)]
    if (h := _HEAD_NORM.match(rest)):
        return [Placement(base + ("self_attn", h.group(1), "weight"), (i, int(h.group(2))))]
    return [Placement(base + tuple(rest.split(".")), (i,))]


def export_keys(cfg: BaseConfig, path: tuple[str, ...], shape: tuple[int, ...]):
    """The inverse of `place`: yields (hf_key, index, transform) for one jaxmodels parameter.

    `index` selects the slice of the parameter that becomes the HF tensor.
    """
    if path[:1] != ("model",) or len(path) < 3 or path[2] != "layers":
        yield ".".join(path), (), None
        return
    stack, rest = path[1], path[3:]
    offset = stack_offset(cfg, stack)
    for i in range(shape[0]):
        prefix = f"model.layers.{offset + i}."
        if rest[:2] == ("mlp", "experts") and rest[2] == "gate_up_proj":
            for e in range(shape[1]):
                for j, proj in enumerate(_GATE_UP):
                    yield f"{prefix}mlp.experts.{e}.{proj}.weight", (i, e, j), None
        elif rest[:2] == ("mlp", "experts"):
            for e in range(shape[1]):
                yield f"{prefix}mlp.experts.{e}.{rest[2]}.weight", (i, e), _transpose
        elif rest[:2] in (("self_attn", "q_layernorm"), ("self_attn", "k_layernorm")):
            for h in range(shape[1]):
                yield f"{prefix}self_attn.{rest[1]}.norms.{h}.weight", (i, h), None
        else:
            yield prefix + ".".join(rest), (i,), None
