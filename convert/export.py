"""Writing Hugging Face checkpoints: `save_pretrained` (a model -> the hub's layout: per-layer, per-expert
keys, [out, in] weights) and `convert_checkpoint` (the `jaxmodels convert` command: checkpoint ->
checkpoint tensor by tensor without building the model, e.g. DeepSeek-V3 FP8 -> bf16). Both write through
`files.atomic_directory`: complete or absent."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from jaxmodels.config import BaseConfig, load_config
from jaxmodels.convert.files import atomic_directory, check_writable_dir
from jaxmodels.convert.hub import resolve_checkpoint
from jaxmodels.convert.keymap import CheckpointError, Placement, export_keys, mtp_shared_exports
from jaxmodels.convert.reader import INDEX_FILE, SINGLE_FILE, Checkpoint, default_dtype, read_tensor
from jaxmodels.convert.validate import SHARED, check_shared_copies, mtp_count, plan_load, state_mtp_layers
from jaxmodels.layers.linear import LoRAParam
from jaxmodels.model import abstract_model, model_class
from jaxmodels.units import parse_size

log = logging.getLogger("jaxmodels.convert")


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


# The files beside the weights that make a checkpoint directory usable by tokenizers / transformers' generate.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def tokenizer_files(src_dir: str) -> list[str]:
    """The TOKENIZER_FILES present in checkpoint directory `src_dir`."""
    return [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(src_dir, name))]


def copy_tokenizer_files(src_dir: str, out_dir: str) -> list[str]:
    """Copies the tokenizer files of `src_dir` into `out_dir`; returns their names."""
    names = tokenizer_files(src_dir)
    for name in names:
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(out_dir, name))
    return names


def _write_checkpoint(out_dir: str, entries: list, config: dict[str, Any], max_shard_size: int | str,
                      progress: bool, tokenizer_from: str | None = None) -> int:
    """Writes `entries` [(hf_key, nbytes, fetch)] (fetch() -> the tensor in HF layout, called once, in
    order) as safetensors shards plus config.json (and the index when sharded), with the tokenizer files of
    `tokenizer_from` when given. Returns the file count.

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
    bar = tqdm(total=len(entries), desc="writing", unit="tensor", disable=not progress)
    try:
        with atomic_directory(out_dir, prefix=".jaxmodels-save-") as stage:
            weight_map = {}
            for shard, fname in zip(shards, names):
                tensors = {}
                for key, _, fetch in shard:
                    tensors[key] = np.ascontiguousarray(fetch())
                    weight_map[key] = fname
                    bar.update()
                save_file(tensors, stage.path(fname), metadata={"format": "pt"})
                del tensors
            with open(stage.path("config.json"), "w") as f:
                json.dump(config, f, indent=2)
            extra = copy_tokenizer_files(tokenizer_from, stage.tmp) if tokenizer_from else []
            if sharded:
                with open(stage.path(INDEX_FILE), "w") as f:
                    total = int(sum(n for _, n, _ in entries))
                    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
            # config and index last; then the previous checkpoint's files the new one does not overwrite go.
            stage.commit(names + extra + ["config.json"] + ([INDEX_FILE] if sharded else []),
                         stale=lambda old: old.endswith(".safetensors") or old == INDEX_FILE)
    finally:
        bar.close()
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
    num_mtp = state_mtp_layers(state)
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
            x = read_tensor(self.ckpt, key)
            self._value = pl.transform(x) if pl.transform is not None else x
            self._key = (key, pl.path)
        return self._value


def convert_checkpoint(name_or_path: str, out_dir: str, dtype=None, *, max_shard_size: int | str = "5GB",
                       progress: bool = True, mtp: bool | None = None) -> str:
    """Rewrites a Hugging Face checkpoint in `dtype` (e.g. DeepSeek-V3 FP8 -> bfloat16) without building
    the model: the checkpoint is validated exactly as `from_pretrained` validates it (every name, shape,
    FP8 scale; MTP layers kept unless mtp=False), then streamed tensor by tensor into new shards, so host memory stays
    near one shard whatever the model size. The result is what `save_pretrained(from_pretrained(...))`
    writes, tensor for tensor, plus the source's tokenizer files (TOKENIZER_FILES). Returns out_dir."""
    path = resolve_checkpoint(os.fspath(name_or_path))
    out_dir = os.fspath(out_dir)
    check_writable_dir(out_dir)  # before any work
    cfg = load_config(path)
    dtype = default_dtype(cfg) if dtype is None else dtype
    ckpt = Checkpoint(path)
    abstract = abstract_model(cfg, dtype, num_mtp_layers=mtp_count(cfg, ckpt, mtp))
    _, abstract_state = nnx.split(abstract)
    plan = plan_load(cfg, ckpt, abstract_state)
    check_shared_copies(ckpt, plan.pop(SHARED, []))
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
    for hf_key, src in mtp_shared_exports(cfg, state_mtp_layers(shapes)):
        (key, pl), = plan[src]
        var = shapes[src]

        def fetch(key=key, pl=pl, target=var.dtype):
            return source.get(key, pl).astype(target)
        entries.append((hf_key, math.prod(var.shape) * np.dtype(var.dtype).itemsize, fetch))
    head = model_class(cfg).head
    _write_checkpoint(out_dir, entries, export_config(cfg, head, abstract.model.embed_tokens.weight.dtype),
                      max_shard_size, progress, tokenizer_from=path)
    return out_dir
