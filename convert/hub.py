"""Where a checkpoint comes from: a local directory, or a hub repo id downloaded when online."""

from __future__ import annotations

import os


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

