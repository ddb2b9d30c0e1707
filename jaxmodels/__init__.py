"""jaxmodels: DeepSeek-V2, DeepSeek-V3 and StableLM in JAX/Flax NNX, loaded from Hugging Face checkpoints."""

from jaxmodels.config import (ConfigError, DeepseekV2Config, DeepseekV3Config, StableLmConfig, config_from_hf,
                              load_config)
from jaxmodels.model import (CausalLM, ModelOutput, SequenceClassification, TokenClassification, abstract_model,
                             init_model)
from jaxmodels.generate import generate  # noqa: E402  (the function shadows the submodule's name, as intended)
from jaxmodels.generate.batch import batch_generate
from jaxmodels.inputs import Inputs
from jaxmodels.options import Options
from jaxmodels.sharding import make_mesh

__version__ = "0.1.0"


def default_model_dir() -> str:
    """The embedded default model: a Hugging Face checkpoint directory inside the installed package (a small
    DeepSeek-V3 trained on Python's standard library by `jaxmodels train`; see its MODEL_CARD.md)."""
    import os

    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")


def from_pretrained(name_or_path, dtype=None, **kwargs):
    """Loads a Hugging Face checkpoint directory (or hub id, when online). See jaxmodels.convert.hf.from_pretrained."""
    from jaxmodels.convert.hf import from_pretrained as _load  # the model library itself knows nothing of files

    return _load(name_or_path, dtype, **kwargs)


def save_pretrained(model, out_dir, **kwargs):
    """Writes the model as a Hugging Face checkpoint (config.json + safetensors) transformers can load."""
    from jaxmodels.convert.hf import save_pretrained as _save

    return _save(model, out_dir, **kwargs)


__all__ = ["default_model_dir", "generate", "batch_generate", "from_pretrained", "save_pretrained", "CausalLM", "SequenceClassification", "TokenClassification",
           "ModelOutput", "DeepseekV2Config", "DeepseekV3Config", "StableLmConfig", "ConfigError", "load_config",
           "config_from_hf", "abstract_model", "init_model", "make_mesh", "Options", "Inputs"]
