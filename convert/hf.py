"""Hugging Face safetensors checkpoints <-> jaxmodels models: the public entry points.

The converter lives in rooms, data flowing one way:
  hub.py       where a checkpoint comes from (a local directory, or a hub id when online)
  reader.py    safetensors reading (one file or an index of shards; tensors as views of the files' pages)
  validate.py  load validation: every key placed, every shape and FP8 scale checked from the headers
  loader.py    the threaded streaming loader (from_pretrained, load_state)
  export.py    save_pretrained and convert_checkpoint (the hub's layout again)
  files.py     the atomic directory writer both exports and LoRA adapters use
  keymap.py    checkpoint key <-> parameter path (the exceptions to HF's names), fp8.py the FP8 blocks
"""

from jaxmodels.convert.export import convert_checkpoint, export_config, save_pretrained
from jaxmodels.convert.hub import resolve_checkpoint
from jaxmodels.convert.keymap import CheckpointError
from jaxmodels.convert.loader import from_pretrained, load_state
from jaxmodels.convert.reader import INDEX_FILE, SINGLE_FILE, Checkpoint

__all__ = ["from_pretrained", "load_state", "save_pretrained", "convert_checkpoint", "export_config",
           "resolve_checkpoint", "CheckpointError", "Checkpoint", "INDEX_FILE", "SINGLE_FILE"]
