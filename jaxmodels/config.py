"""Frozen configuration dataclasses for the three families, read from and written to HF config.json.

Every field the transformers documentation lists for DeepseekV2Config, DeepseekV3Config and
StableLmConfig is here with transformers' default. Values we cannot honour raise `ConfigError`
naming the field; nothing is silently ignored. Configs are hashable so they can be static
arguments of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A config.json value jaxmodels does not support (the message names the field and the fix)."""


SUPPORTED_ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")

# Keys of rope_parameters / rope_scaling we understand.
_ROPE_KEYS = {
    "rope_type", "type", "rope_theta", "factor", "partial_rotary_factor", "original_max_position_embeddings",
    "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate",
    "low_freq_factor", "high_freq_factor",
}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (transformers' `rope_parameters`, legacy `rope_scaling` + `rope_theta`)."""

    rope_type: str = "default"
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    # llama3
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None

    @classmethod
    def from_hf(cls, raw: dict[str, Any], *, default_partial: float = 1.0) -> "RopeConfig":
        """Builds the rope config from a config.json dict (current or legacy keys)."""
        params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"rope_parameters must be a dict, got {type(params).__name__}")
        unknown = set(params) - _ROPE_KEYS
        if unknown:
            raise ConfigError(
                f"rope_parameters has keys jaxmodels does not understand: {sorted(unknown)}; "
                f"supported keys are {sorted(_ROPE_KEYS)}"
            )
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope_parameters.rope_type={rope_type!r} is not supported; use one of {SUPPORTED_ROPE_TYPES}"
            )
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
        partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", default_partial))
        factor = params.get("factor")
        if rope_type in ("linear", "dynamic", "llama3") and factor is None:
            raise ConfigError(f"rope_parameters.factor is required for rope_type={rope_type!r}")
        if factor is not None and factor < 1.0 and rope_type in ("linear", "dynamic", "yarn"):
            raise ConfigError(f"rope_parameters.factor={factor} must be >= 1")
        if rope_type == "llama3" and (params.get("low_freq_factor") is None or params.get("high_freq_factor") is None):
            raise ConfigError("rope_type='llama3' needs rope_parameters.low_freq_factor and high_freq_factor")
        omax = params.get("original_max_position_embeddings")
        if rope_type in ("yarn", "llama3") and omax is None:
            omax = raw.get("original_max_position_embeddings", raw.get("max_position_embeddings"))
        if rope_type == "llama3" and omax is None:
            raise ConfigError("rope_type='llama3' needs rope_parameters.original_max_position_embeddings")
        return cls(
            rope_type=rope_type, rope_theta=float(theta), partial_rotary_factor=float(partial),
            factor=None if factor is None else float(factor),
            original_max_position_embeddings=None if omax is None else int(omax),
            beta_fast=params.get("beta_fast"), beta_slow=params.get("beta_slow"),
            mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
            attention_factor=params.get("attention_factor"), truncate=bool(params.get("truncate", True)),
            low_freq_factor=params.get("low_freq_factor"), high_freq_factor=params.get("high_freq_factor"),
        )

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        for name in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                     "mscale_all_dim", "attention_factor", "low_freq_factor", "high_freq_factor"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.rope_type == "yarn" and not self.truncate:
            out["truncate"] = False
        if self.partial_rotary_factor != 1.0:
            out["partial_rotary_factor"] = self.partial_rotary_factor
        return out


class FrozenDict(tuple):
    """A JSON object kept hashable inside a frozen config: a tuple of (key, value) pairs that
    remembers it was a dict, so `to_hf()` writes it back as an object (not a list of pairs)."""

    def to_dict(self) -> dict[str, Any]:
        return {k: _untupled(v) for k, v in self}


def _tupled(value):
    """JSON value -> hashable value (lists -> tuples, objects -> FrozenDict), recursively."""
    if isinstance(value, list):
        return tuple(_tupled(v) for v in value)
    if isinstance(value, dict):
        return FrozenDict((k, _tupled(v)) for k, v in value.items())
    return value


def _untupled(value):
    """The inverse of `_tupled`: the JSON value config.json had."""
    if isinstance(value, FrozenDict):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_untupled(v) for v in value]
    return value


@dataclass(frozen=True)
class BaseConfig:
    """Fields shared by every family. Subclasses set `model_type` and family defaults."""

    model_type: ClassVar[str] = ""
    family: ClassVar[str] = ""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope: RopeConfig = field(default_factory=RopeConfig)
    attention_dropout: float = 0.0
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    # Heads: which architecture config.json names, and the classification label set.
    architectures: tuple[str, ...] = ()
    num_labels: int = 2
    id2label: tuple[tuple[str, str], ...] | None = None
    classifier_dropout: float | None = None
    token_classification_bias: bool = True
    # Keys of config.json we keep for the round trip but do not use (e.g. torch_dtype, auto_map).
    extra: tuple[tuple[str, Any], ...] = ()

    # Keys of config.json that are consumed elsewhere (not dataclass fields).
    _consumed: ClassVar[tuple[str, ...]] = (
        "model_type", "rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor", "label2id",
        "transformers_version", "head_dim", "qk_head_dim",
    )
    # Other names transformers accepts for a field (its configs' `attribute_map`).
    _aliases: ClassVar[dict[str, str]] = {}
    # Keys accepted and dropped: they only matter to PyTorch training or HF bookkeeping.
    _ignored: ClassVar[tuple[str, ...]] = (
        "dtype", "torch_dtype", "output_router_logits", "return_dict", "output_hidden_states", "output_attentions",
        "is_decoder", "_name_or_path", "auto_map", "use_return_dict", "problem_type", "tokenizer_class",
        "router_aux_loss_coef", "aux_loss_alpha", "seq_aux", "ep_size", "_attn_implementation",
        "pretraining_tp", "chunk_size_feed_forward", "add_cross_attention", "tie_encoder_decoder",
    )

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.architectures is None:  # transformers writes `"architectures": null` for a bare config
            object.__setattr__(self, "architectures", ())
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported; use one of {SUPPORTED_ACTIVATIONS}")
        for name in ("vocab_size", "hidden_size", "num_attention_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_hidden_layers < 0:
            raise ConfigError(f"num_hidden_layers must be >= 0, got {self.num_hidden_layers}")

    # ----- HF config.json round trip -----
    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> "BaseConfig":
        """Builds the config from a parsed config.json dict."""
        raw = dict(raw)
        names = {f.name for f in dataclasses.fields(cls)} - {"rope", "extra"}
        kwargs: dict[str, Any] = {}
        extra = []
        for key, value in raw.items():
            key = cls._aliases.get(key, key)
            if key in names:
                kwargs[key] = _tupled(value) if isinstance(value, (list, dict)) else value
            elif key in cls._ignored:
                extra.append((key, _tupled(value)))
            elif key not in cls._consumed:
                cls._unknown_key(key, value)
                extra.append((key, _tupled(value)))
        if "id2label" in raw and raw["id2label"] is not None:
            kwargs["id2label"] = tuple((str(k), str(v)) for k, v in raw["id2label"].items())
            kwargs.setdefault("num_labels", len(raw["id2label"]))
        kwargs["rope"] = RopeConfig.from_hf(raw, default_partial=cls._default_partial_rotary())
        kwargs["extra"] = tuple(extra)
        return cls(**kwargs)

    @classmethod
    def _default_partial_rotary(cls) -> float:
        return 1.0

    @classmethod
    def _unknown_key(cls, key: str, value: Any) -> None:
        """Unknown keys are kept (for the round trip); families refuse the ones that change the math."""

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict transformers' AutoConfig accepts for this model."""
        out: dict[str, Any] = {"model_type": self.model_type}
        for f in dataclasses.fields(self):
            if f.name in ("rope", "extra", "id2label"):
                continue
            out[f.name] = _untupled(getattr(self, f.name))
        if self.id2label is not None:
            out["id2label"] = {k: v for k, v in self.id2label}
            out["label2id"] = {v: int(k) for k, v in self.id2label}
        out["rope_parameters"] = self.rope.to_hf()
        for key, value in self.extra:
            out[key] = _untupled(value)
        if not out["architectures"]:
            out["architectures"] = None  # as transformers writes a config that names no head
        return out

    def default_architecture(self) -> str:
        return self.hf_class_prefix + "ForCausalLM"

    hf_class_prefix: ClassVar[str] = ""

    @property
    def head(self) -> str:
        """'causal_lm', 'sequence_classification' or 'token_classification', from `architectures`."""
        arch = self.architectures[0] if self.architectures else self.default_architecture()
        for suffix, head in (("ForCausalLM", "causal_lm"), ("ForSequenceClassification", "sequence_classification"),
                             ("ForTokenClassification", "token_classification"), ("Model", "base")):
            if arch.endswith(suffix):
                return head
        raise ConfigError(
            f"architectures={list(self.architectures)} names a head jaxmodels does not have; supported: "
            f"{self.hf_class_prefix}ForCausalLM, ForSequenceClassification, ForTokenClassification"
        )

    def replace(self, **changes) -> "BaseConfig":
        return dataclasses.replace(self, **changes)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return tuple(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)


@dataclass(frozen=True)
class DeepseekConfig(BaseConfig):
    """Shared fields of DeepSeek-V2 and V3 (MLA attention + DeepSeekMoE)."""

    family: ClassVar[str] = "deepseek"

    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    pretraining_tp: int = 1
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    n_routed_experts: int | None = 64
    n_shared_experts: int | None = 2
    moe_intermediate_size: int = 1407
    num_experts_per_tok: int | None = None
    first_k_dense_replace: int = 0
    n_group: int | None = None
    topk_group: int | None = None
    topk_method: str = "greedy"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    scoring_func: str = "softmax"
    moe_layer_freq: int = 1

    def __post_init__(self):
        super().__post_init__()
        if self.moe_layer_freq != 1:
            raise ConfigError(f"moe_layer_freq={self.moe_layer_freq} is not supported; only 1 (every layer after "
                              "first_k_dense_replace is MoE) is")
        if self.is_moe:
            if self.n_routed_experts <= 0 or self.num_experts_per_tok > self.n_routed_experts:
                raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                                  f"[1, n_routed_experts={self.n_routed_experts}]")
            if self.topk_method in ("group_limited_greedy", "noaux_tc"):
                if not self.n_group or not self.topk_group:
                    raise ConfigError(f"topk_method={self.topk_method!r} needs n_group and topk_group")
                if self.n_routed_experts % self.n_group:
                    raise ConfigError(f"n_routed_experts={self.n_routed_experts} is not divisible by "
                                      f"n_group={self.n_group}")
                if self.topk_group > self.n_group:
                    raise ConfigError(f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
        if self.first_k_dense_replace < 0:
            raise ConfigError(f"first_k_dense_replace must be >= 0, got {self.first_k_dense_replace}")

    @property
    def is_moe(self) -> bool:
        return bool(self.n_routed_experts) and bool(self.num_experts_per_tok)

    @property
    def num_dense_layers(self) -> int:
        return self.num_hidden_layers if not self.is_moe else min(self.first_k_dense_replace, self.num_hidden_layers)

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.num_dense_layers

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim**-0.5, times mscale**2 under YaRN with `mscale_all_dim` (as transformers does)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope.rope_type != "default" and self.rope.mscale_all_dim:
            factor = self.rope.factor
            if factor is not None and factor > 1:
                m = 0.1 * self.rope.mscale_all_dim * math.log(factor) + 1.0
                scale *= m * m
        return scale

    @property
    def rope_head_dim(self) -> int:
        return self.qk_rope_head_dim


@dataclass(frozen=True)
class DeepseekV2Config(DeepseekConfig):
    model_type: ClassVar[str] = "deepseek_v2"
    hf_class_prefix: ClassVar[str] = "DeepseekV2"

    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    max_position_embeddings: int = 2048
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    mlp_bias: bool = False

    _aliases: ClassVar[dict[str, str]] = {"num_experts": "n_routed_experts"}

    def __post_init__(self):
        # The family's router methods first: a V3 router in a V2 config should be named as such.
        if self.is_moe and self.topk_method not in ("greedy", "group_limited_greedy"):
            raise ConfigError(f"topk_method={self.topk_method!r} is not a DeepSeek-V2 router; use 'greedy' or "
                              "'group_limited_greedy' (or model_type deepseek_v3 for 'noaux_tc')")
        super().__post_init__()
        if self.scoring_func != "softmax":
            raise ConfigError(f"scoring_func={self.scoring_func!r} is not supported for deepseek_v2; only 'softmax'")


@dataclass(frozen=True)
class DeepseekV3Config(DeepseekConfig):
    model_type: ClassVar[str] = "deepseek_v3"
    hf_class_prefix: ClassVar[str] = "DeepseekV3"

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = 128
    n_shared_experts: int | None = 1
    n_routed_experts: int | None = 256
    routed_scaling_factor: float = 2.5
    n_group: int | None = 8
    topk_group: int | None = 4
    num_experts_per_tok: int | None = 8
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    max_position_embeddings: int = 4096
    bos_token_id: int | None = 0
    eos_token_id: int | tuple[int, ...] | None = 1
    rope_interleave: bool = True
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    num_nextn_predict_layers: int = 1
    quantization_config: FrozenDict | None = None

    _aliases: ClassVar[dict[str, str]] = {"num_local_experts": "n_routed_experts",
                                          "num_mtp_layers": "num_nextn_predict_layers"}

    def __post_init__(self):
        if self.is_moe and self.topk_method != "noaux_tc":
            raise ConfigError(f"topk_method={self.topk_method!r} is not supported for deepseek_v3; transformers "
                              "implements only 'noaux_tc' (sigmoid + e_score_correction_bias)")
        super().__post_init__()
        if self.scoring_func != "sigmoid":
            raise ConfigError(f"scoring_func={self.scoring_func!r} is not supported for deepseek_v3; only 'sigmoid'")
        if self.quantization_config is not None:
            q = _untupled(self.quantization_config)
            if (not isinstance(q, dict) or q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3"
                    or list(q.get("weight_block_size", [128, 128])) != [128, 128]):
                raise ConfigError(f"quantization_config={q} is not supported; only DeepSeek's fp8 (fmt e4m3, "
                                  "weight_block_size [128, 128]) is, dequantised at load")



@dataclass(frozen=True)
class StableLmConfig(BaseConfig):
    model_type: ClassVar[str] = "stablelm"
    family: ClassVar[str] = "stablelm"
    hf_class_prefix: ClassVar[str] = "StableLm"

    vocab_size: int = 50304
    intermediate_size: int = 6912
    hidden_size: int = 2560
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    max_position_embeddings: int = 4096
    layer_norm_eps: float = 1e-5
    use_qkv_bias: bool = False
    qk_layernorm: bool = False
    use_parallel_residual: bool = False
    hidden_dropout: float = 0.0
    bos_token_id: int | None = 0
    eos_token_id: int | tuple[int, ...] | None = 0
    rope: RopeConfig = field(default_factory=lambda: RopeConfig(partial_rotary_factor=0.25))

    @classmethod
    def _default_partial_rotary(cls) -> float:
        return 0.25

    def __post_init__(self):
        super().__post_init__()
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} is not divisible by "
                              f"num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not divisible by "
                              f"num_key_value_heads={self.num_key_value_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_head_dim(self) -> int:
        return self.head_dim

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope.partial_rotary_factor)


CONFIG_CLASSES: dict[str, type[BaseConfig]] = {
    c.model_type: c for c in (DeepseekV2Config, DeepseekV3Config, StableLmConfig)
}


def config_from_hf(raw: dict[str, Any]) -> BaseConfig:
    """Picks the family from `model_type` and builds its config."""
    model_type = raw.get("model_type")
    if model_type not in CONFIG_CLASSES:
        raise ConfigError(f"model_type={model_type!r} is not supported; jaxmodels supports {sorted(CONFIG_CLASSES)}")
    return CONFIG_CLASSES[model_type].from_hf(raw)


def load_config(path: str | os.PathLike) -> BaseConfig:
    """Reads `config.json` from a checkpoint directory (or the file itself)."""
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise FileNotFoundError(f"no config.json at {file}: pass a Hugging Face checkpoint directory")
    try:
        with open(file) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON ({e}); re-download the checkpoint's config.json") from e
    return config_from_hf(raw)
