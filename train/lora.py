"""LoRA adapters: add them to a model, fold them in, and read/write them as PEFT adapters.

An adapter is a variant of the linear layer (jaxmodels.layers.linear.Linear: `lora_a` [r, in], `lora_b`
[out, r], static `lora_scale` = alpha / r), held as `LoRAParam` variables so a trainer selects them with
`nnx.split(model, LoRAParam, nnx.Param, ...)`. Inside a layer stack they carry the stack's leading `layers`
axis (and the routed experts' `experts` axis), like every other parameter there, and logical axis names
derived from the weight they adapt, so the sharding table places them.

Targets are transformers module names (`q_b_proj`, `o_proj`, `gate_proj`, ...), matched on the last path
element of every linear layer inside the decoder's layer stacks, the way PEFT's `target_modules` matches
module-name suffixes; `experts` adapts DeepSeek's routed experts (one adapter per expert and projection).

Files: `save_adapter` writes what `peft.PeftModel.from_pretrained` reads (adapter_config.json and
adapter_model.safetensors with PEFT's key names); `load_adapter` reads it back. Both are written atomically.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxmodels import sharding
from jaxmodels.config import DeepseekConfig
from jaxmodels.convert.files import atomic_directory
from jaxmodels.layers.linear import Linear, LoRAParam
from jaxmodels.layers.moe import Experts

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

DEEPSEEK_TARGETS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                    "gate_proj", "up_proj", "down_proj", "experts")
STABLELM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "base": "CAUSAL_LM", "sequence_classification": "SEQ_CLS",
               "token_classification": "TOKEN_CLS"}
_PEFT_PREFIX = "base_model.model."
_PEFT_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight$")


def default_targets(cfg) -> tuple[str, ...]:
    """What `jaxmodels train --lora-rank R` adapts without --lora-targets: every attention projection, and on
    StableLM every MLP projection too. DeepSeek's dense / shared-expert MLP is left out because it could not
    be exported as a PEFT adapter (`peft_unwritable`); name it in --lora-targets to adapt it anyway (the
    merged export still works)."""
    if isinstance(cfg, DeepseekConfig):
        attn = ("q_proj",) if cfg.q_lora_rank is None else ("q_a_proj", "q_b_proj")
        return attn + ("kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
    return STABLELM_TARGETS


def peft_unwritable(cfg, targets) -> list[str]:
    """The targets a PEFT adapter cannot hold: on DeepSeek, peft (>= 0.19 with transformers 5) reads the names
    gate_proj / up_proj / down_proj as the routed experts (the v4 hub modules `mlp.experts.{e}.gate_proj`,
    which transformers 5 fuses) and drops them for every other MLP, so adapters on the dense / shared-expert
    MLPs cannot be expressed."""
    if not isinstance(cfg, DeepseekConfig):
        return []
    return sorted(t for t in targets if t in _MLP_NAMES)


class LoRAError(ValueError):
    """A LoRA request or adapter file that does not fit the model (the message names the cause and the fix)."""


def valid_targets(model) -> tuple[str, ...]:
    """The target names this model's family accepts."""
    return DEEPSEEK_TARGETS if isinstance(model.config, DeepseekConfig) else STABLELM_TARGETS


def _stacked_modules(model):
    """Yields (path, module) for every Linear and Experts inside the decoder's layer stacks.

    path: ('model', stack, 'layers', ...), e.g. ('model', 'moe_layers', 'layers', 'mlp', 'experts')."""
    for name, stack in model.model.stacks().items():
        for sub, node in nnx.iter_graph(stack.layers):
            if isinstance(node, (Linear, Experts)):
                yield ("model", name, "layers") + tuple(str(p) for p in sub), node


def _target_of(path, node) -> str:
    return "experts" if isinstance(node, Experts) else path[-1]


def _lora_modules(model):
    """(path, module) of every module inside the stacks that holds an adapter."""
    for path, node in _stacked_modules(model):
        if isinstance(node, Linear) and node.lora_a is not None:
            yield path, node
        elif isinstance(node, Experts) and node.lora_scale is not None:
            yield path, node


def has_lora(model) -> bool:
    """True when any layer of `model` holds a LoRA adapter."""
    return any(True for _ in _lora_modules(model))


def lora_config(model) -> dict | None:
    """{'rank', 'alpha', 'targets' (sorted)} of the adapters on `model` (for a resume check), None without."""
    rank, alpha, targets = None, None, set()
    for path, node in _lora_modules(model):
        a = node.lora_a if isinstance(node, Linear) else node.gate_proj_lora_a
        r = int(a.shape[-2])
        al = node.lora_scale * r
        al = int(round(al)) if abs(al - round(al)) < 1e-9 else al
        rank, alpha = (r, al) if rank is None else (rank, alpha)
        targets.add(_target_of(path, node))
    if rank is None:
        return None
    return {"rank": rank, "alpha": alpha, "targets": sorted(targets)}


def _adapter_axes(weight_axes, ndim: int):
    """Logical axes of A [..., r, in] and B [..., out, r] from the adapted weight's [..., out, in] axes."""
    axes = tuple(weight_axes) if weight_axes else (None,) * ndim
    lead = axes[:-2]
    return lead + (None, axes[-1]), lead + (axes[-2], None)


def _new_pair(key, lead_shape, out_f: int, in_f: int, axes_out_in, rank: int, dtype, mesh, rules):
    """A (PEFT's kaiming-uniform init: U(-1/sqrt(in), 1/sqrt(in))) and B (zeros) as LoRAParams."""
    a_axes, b_axes = _adapter_axes(axes_out_in, len(lead_shape) + 2)
    bound = 1.0 / math.sqrt(in_f)
    a = jax.random.uniform(key, lead_shape + (rank, in_f), jnp.float32, -bound, bound).astype(dtype)
    b = jnp.zeros(lead_shape + (out_f, rank), dtype)
    a, b = LoRAParam(a, axes=a_axes), LoRAParam(b, axes=b_axes)
    if mesh is not None:
        a.set_value(jax.device_put(a.get_value(), sharding.param_sharding(a, mesh, rules)))
        b.set_value(jax.device_put(b.get_value(), sharding.param_sharding(b, mesh, rules)))
    return a, b


def add_lora(model, *, rank: int, alpha: float, targets: Sequence[str], seed: int = 0, dtype=jnp.float32):
    """Adds LoRA adapters, in place, to the linear layers of the decoder stacks named in `targets`.

    rank: r > 0; alpha: the scale is alpha / r; targets: transformers module names (see `valid_targets`),
    plus `experts` for DeepSeek's routed experts. A is initialised as PEFT does (kaiming-uniform), B to
    zero, so the adapted model starts equal to the base model. Adapters of a stacked layer get the
    stack's leading `layers` axis (each layer its own random A), experts' adapters an `experts` axis too.
    dtype: the adapters' dtype (float32 master weights; the forward casts them to the activations' dtype).
    On a model placed on a mesh, the adapters are placed by the same sharding table. Returns `model`.
    """
    if isinstance(targets, str):
        targets = [targets]
    targets = list(dict.fromkeys(targets))
    if not isinstance(rank, int) or rank <= 0:
        raise LoRAError(f"rank must be a positive integer, got {rank!r}")
    if not alpha or alpha <= 0:
        raise LoRAError(f"alpha must be positive, got {alpha!r}")
    if not targets:
        raise LoRAError(f"no targets given; choose from {list(valid_targets(model))}")
    valid = valid_targets(model)
    unknown = [t for t in targets if t not in valid]
    if unknown:
        raise LoRAError(f"unknown LoRA target(s) {unknown} for {type(model.config).__name__}; valid targets: "
                        f"{list(valid)}")
    if has_lora(model):
        raise LoRAError(f"the model already has LoRA adapters ({lora_config(model)}); merge_lora() them first "
                        "or start from the base model")
    scale = float(alpha) / rank
    mesh, rules = getattr(model.model, "mesh", None), getattr(model.model, "sharding_rules", None)
    key = jax.random.key(seed)
    matched = set()
    for path, node in list(_stacked_modules(model)):
        target = _target_of(path, node)
        if target not in targets:
            continue
        matched.add(target)
        key, sub = jax.random.split(key)
        if isinstance(node, Linear):
            w = node.weight
            *lead, out_f, in_f = w.shape
            node.lora_a, node.lora_b = _new_pair(sub, tuple(lead), out_f, in_f, w.get_metadata().get("axes"),
                                                 rank, dtype, mesh, rules)
            node.lora_scale = scale
        else:
            for name, k in zip(Experts.PROJECTIONS, jax.random.split(sub, 3)):
                shape, axes_out_in = node.projection_layout(name)  # [..., E, out, in]: PEFT's convention
                *lead, out_f, in_f = shape
                a, b = _new_pair(k, tuple(lead), out_f, in_f, axes_out_in, rank, dtype, mesh, rules)
                setattr(node, f"{name}_lora_a", a)
                setattr(node, f"{name}_lora_b", b)
            node.lora_scale = scale
    missing = [t for t in targets if t not in matched]
    if missing:
        present = sorted({_target_of(p, n) for p, n in _stacked_modules(model)})
        raise LoRAError(f"LoRA target(s) {missing} match no layer of this model (its adaptable layers: {present}); "
                        "e.g. q_proj exists only when q_lora_rank is null, experts only with MoE layers")
    return model


def merge_lora(model):
    """Folds every adapter into its base weight (W + alpha/r * B @ A, in float32) and removes the adapters, in
    place. The result is a plain model (save_pretrained exports it as an HF checkpoint). Returns `model`."""
    for _, node in list(_lora_modules(model)):
        if isinstance(node, Linear):
            node.weight.set_value(node.merged_weight())
            node.lora_a = node.lora_b = None
        else:
            for name, w in zip(Experts.PARAMS, node.weights()):
                getattr(node, name).set_value(w)
            for name in Experts.PROJECTIONS:
                setattr(node, f"{name}_lora_a", None)
                setattr(node, f"{name}_lora_b", None)
        node.lora_scale = None
    return model


# ------------------------------------------------------------------------------------------ PEFT files

_MLP_NAMES = ("gate_proj", "up_proj", "down_proj")
_PEFT_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)$")


def _peft_entries(model):
    """Yields (peft key, LoRAParam, index) for every adapter slice: index (layer,) of a Linear adapter,
    (layer, expert) of a routed-expert adapter, whose keys are the hub's per-expert module names
    (`mlp.experts.{e}.gate_proj`), the layout peft converts onto transformers 5's fused experts."""
    for path, node in _lora_modules(model):
        stack, rest = path[1], ".".join(path[3:])
        offset = getattr(model.model, stack).offset  # checkpoint index of the stack's first layer
        if isinstance(node, Linear):
            for i in range(node.lora_a.shape[0]):
                prefix = f"{_PEFT_PREFIX}model.layers.{offset + i}.{rest}"
                yield f"{prefix}.lora_A.weight", node.lora_a, (i,)
                yield f"{prefix}.lora_B.weight", node.lora_b, (i,)
        else:
            for name in Experts.PROJECTIONS:
                a, b = getattr(node, f"{name}_lora_a"), getattr(node, f"{name}_lora_b")
                for i in range(a.shape[0]):
                    for e in range(a.shape[1]):
                        prefix = f"{_PEFT_PREFIX}model.layers.{offset + i}.{rest}.{e}.{name}"
                        yield f"{prefix}.lora_A.weight", a, (i, e)
                        yield f"{prefix}.lora_B.weight", b, (i, e)


def _peft_target_modules(model, targets: list[str]) -> list[str]:
    """PEFT's target_modules for our targets; DeepSeek's `experts` is written as gate/up/down_proj (see
    peft_unwritable)."""
    if not isinstance(model.config, DeepseekConfig):
        return sorted(targets)
    mlp = peft_unwritable(model.config, targets)
    if mlp:
        raise LoRAError(
            f"DeepSeek adapters on the dense / shared-expert MLP ({mlp}) cannot be written as a PEFT adapter: with "
            "transformers 5, peft reinterprets target_modules gate_proj/up_proj/down_proj as the fused routed "
            "experts and would silently drop these adapters. Export the merged model instead (merge_lora(model), "
            "then save_pretrained), or adapt only attention projections and `experts`.")
    out = [t for t in targets if t != "experts"]
    if "experts" in targets:
        out += list(_MLP_NAMES)
    return sorted(out)


def save_adapter(model, out_dir: str, base_model_name_or_path: str | None = None) -> str:
    """Writes the model's adapters as a PEFT LoRA adapter in `out_dir`: adapter_config.json and
    adapter_model.safetensors (`base_model.model.model.layers.{i}.{module}.lora_A.weight` [r, in],
    `...lora_B.weight` [out, r], in the adapters' dtype). Layer indices are global (DeepSeek's dense stack
    first, then its MoE stack). Routed-expert adapters are written per expert
    (`...mlp.experts.{e}.gate_proj.lora_A.weight`) under target_modules gate_proj/up_proj/down_proj, which
    peft fuses onto transformers 5's `gate_up_proj` / `down_proj` parameters when it loads them.
    Written to a temporary directory inside out_dir, then moved in. Returns out_dir.
    Raises LoRAError without adapters, or for DeepSeek dense/shared-MLP adapters (see _peft_target_modules)."""
    cfg = lora_config(model)
    if cfg is None:
        raise LoRAError("the model has no LoRA adapters to save; add_lora() (or load_adapter()) first")
    target_modules = _peft_target_modules(model, cfg["targets"])
    tensors, host = {}, {}
    for key, var, index in _peft_entries(model):
        if id(var) not in host:  # one device->host copy per variable
            host = {id(var): np.asarray(jax.device_get(var.get_value()))}
        tensors[key] = np.ascontiguousarray(host[id(var)][index])
    config = {
        "peft_type": "LORA",
        "task_type": _TASK_TYPES[model.head],
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg["rank"],
        "lora_alpha": cfg["alpha"],
        "target_modules": target_modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    with atomic_directory(out_dir, prefix=".jaxmodels-adapter-") as stage:
        save_file(tensors, stage.path(ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(stage.path(ADAPTER_CONFIG), "w") as f:
            json.dump(config, f, indent=2)
        stage.commit([ADAPTER_WEIGHTS, ADAPTER_CONFIG])  # config last: its presence marks a complete adapter
    return out_dir


def _read_adapter_config(adapter_dir: str) -> dict:
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {adapter_dir!r}: pass a PEFT LoRA adapter directory")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise LoRAError(f"{path} is not valid JSON ({e})") from e
    if cfg.get("peft_type") != "LORA":
        raise LoRAError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported, only LORA")
    for field, ok in (("use_dora", False), ("use_rslora", False), ("fan_in_fan_out", False)):
        if cfg.get(field, ok) != ok:
            raise LoRAError(f"{path}: {field}={cfg[field]!r} is not supported (only plain LoRA)")
    for field in ("rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save", "target_parameters"):
        if cfg.get(field):
            raise LoRAError(f"{path}: {field}={cfg[field]!r} is not supported")
    if cfg.get("bias", "none") != "none":
        raise LoRAError(f"{path}: bias={cfg['bias']!r} is not supported, only 'none'")
    if not isinstance(cfg.get("target_modules"), list):
        raise LoRAError(f"{path}: target_modules must be a list of module names, got {cfg.get('target_modules')!r}")
    return cfg


def load_adapter(model, adapter_dir: str, *, dtype=jnp.float32):
    """Reads a PEFT LoRA adapter (as `save_adapter` writes it) onto `model`, in place. A model without
    adapters gets them (add_lora with the adapter's r, lora_alpha, target_modules); one with adapters must
    have the same configuration. Every adapter slot must be filled, every tensor must find its slot.
    Returns `model`."""
    adapter_dir = os.fspath(adapter_dir)
    cfg = _read_adapter_config(adapter_dir)
    weights = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.exists(weights):
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {adapter_dir!r}")
    with safe_open(weights, framework="numpy") as f:
        keys = list(f.keys())
    # Our targets from the tensors themselves (target_modules' gate_proj may mean the routed experts).
    targets = set()
    for key in keys:
        m = _PEFT_KEY.match(key)
        if not m:
            raise LoRAError(f"{weights}: tensor {key!r} is not a LoRA weight of a decoder layer "
                            "(base_model.model.model.layers.{i}.<module>.lora_A/B.weight)")
        targets.add("experts" if _PEFT_EXPERT.match(m.group(2)) else m.group(2).rsplit(".", 1)[-1])
    want = {"rank": int(cfg["r"]), "alpha": cfg["lora_alpha"], "targets": sorted(targets)}
    if has_lora(model):
        have = lora_config(model)
        if (have["rank"], float(have["alpha"]), have["targets"]) != (want["rank"], float(want["alpha"]),
                                                                    want["targets"]):
            raise LoRAError(f"the model's adapters {have} differ from the adapter in {adapter_dir} {want}")
    else:
        add_lora(model, rank=want["rank"], alpha=want["alpha"], targets=want["targets"], dtype=dtype)
    slots = {key: (var, index) for key, var, index in _peft_entries(model)}
    # Gather per-variable updates on the host, then write each variable once.
    updates: dict[int, tuple] = {}
    with safe_open(weights, framework="numpy") as f:
        extra = [k for k in keys if k not in slots]
        if extra:
            raise LoRAError(f"{weights}: tensor(s) {extra[:3]}{' ...' if len(extra) > 3 else ''} have no place in "
                            f"this model (expected keys like {next(iter(slots))!r}); is it the adapter of another "
                            "model?")
        missing = [k for k in slots if k not in keys]
        if missing:
            raise LoRAError(f"{weights} lacks {len(missing)} adapter tensor(s), e.g. {missing[0]!r}")
        for key in keys:
            var, index = slots[key]
            if id(var) not in updates:
                updates[id(var)] = (var, np.array(jax.device_get(var.get_value())))
            value = f.get_tensor(key)
            host = updates[id(var)][1]
            if value.shape != host[index].shape:
                raise LoRAError(f"{weights}: {key} has shape {value.shape}, the model expects {host[index].shape}")
            host[index] = value.astype(host.dtype)
    for var, host in updates.values():
        old = var.get_value()
        var.set_value(jax.device_put(jnp.asarray(host, old.dtype), old.sharding))
    return model


__all__ = ["LoRAParam", "LoRAError", "add_lora", "merge_lora", "has_lora", "lora_config", "save_adapter",
           "load_adapter", "valid_targets", "DEEPSEEK_TARGETS", "STABLELM_TARGETS"]
