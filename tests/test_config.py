"""Configs: config.json <-> frozen dataclasses, checked against transformers' own config classes."""

import dataclasses
import json

import pytest
import transformers

from jaxmodels.config import (CONFIG_CLASSES, ConfigError, DeepseekV2Config, DeepseekV3Config, RopeConfig,
                              StableLmConfig, config_from_hf, load_config)
from tiny import hf_config

HF_CLASSES = {
    "deepseek_v2": transformers.DeepseekV2Config,
    "deepseek_v3": transformers.DeepseekV3Config,
    "stablelm": transformers.StableLmConfig,
}
FAMILIES = sorted(HF_CLASSES)

# transformers fields we deliberately do not keep as dataclass fields, and where they go instead.
NOT_FIELDS = {
    "rope_parameters": "parsed into `rope` (RopeConfig)",
    "head_dim": "derived (qk_rope_head_dim for DeepSeek, hidden_size // heads for StableLM)",
    "output_router_logits": "training-only output switch, kept in `extra`",
    "num_mtp_layers": "alias of num_nextn_predict_layers (transformers' attribute_map)",
}

# A DeepSeek-V3 config.json as the hub ships it (legacy rope_scaling, FP8 quantization_config,
# remote-code keys), shrunk.
HUB_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model"},
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True, "tie_word_embeddings": False,
    "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "transformers_version": "4.33.1",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}


# DeepSeek-V2-Lite's and StableLM-2-1.6B's config.json as the hub ships them.
HUB_V2 = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config"}, "aux_loss_alpha": 0.001,
    "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v2", "moe_intermediate_size": 1408,
    "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16,
    "pretraining_tp": 1, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                                            "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                                            "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "transformers_version": "4.39.3", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
}
HUB_STABLELM = {
    "architectures": ["StableLmForCausalLM"], "bos_token_id": 100257, "eos_token_id": 100257, "hidden_act": "silu",
    "hidden_dropout": 0.0, "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 5632,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 4096, "model_type": "stablelm", "num_attention_heads": 32,
    "num_hidden_layers": 24, "num_key_value_heads": 32, "partial_rotary_factor": 0.25, "qk_layernorm": False,
    "rope_scaling": None, "rope_theta": 10000, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.40.0.dev0", "use_cache": True, "use_parallel_residual": False, "use_qkv_bias": True,
    "vocab_size": 100352,
}
HUB = {"deepseek_v2": HUB_V2, "deepseek_v3": HUB_V3, "stablelm": HUB_STABLELM}


def _norm(v):
    """Compare JSON-ish values: lists and tuples alike, dicts by items."""
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _norm(x) for k, x in v.items()}
    return v


def _hf_field_defaults(cls):
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_defaults_match_transformers(family):
    """Every field transformers' config class declares has the same default in ours (or is listed in
    NOT_FIELDS with the reason), and our rope default equals transformers' standardised default."""
    ours_cls, hf_cls = CONFIG_CLASSES[family], HF_CLASSES[family]
    base = {f.name for f in dataclasses.fields(transformers.PreTrainedConfig)}
    ours = ours_cls()
    ours_fields = {f.name for f in dataclasses.fields(ours_cls)}
    hf_defaults = _hf_field_defaults(hf_cls)
    checked = 0
    for name, default in hf_defaults.items():
        if name in base and name != "architectures":
            continue  # bookkeeping (dtype, return_dict, ...)
        if name in NOT_FIELDS:
            continue
        assert name in ours_fields, f"{family}: transformers field {name!r} is missing from {ours_cls.__name__}"
        theirs = () if (name == "architectures" and default is None) else default
        if name == "num_key_value_heads" and theirs is None:
            theirs = ours.num_attention_heads  # both fill it from num_attention_heads in __post_init__
        assert _norm(getattr(ours, name)) == _norm(theirs), (family, name, getattr(ours, name), theirs)
        checked += 1
    assert checked >= 15
    # Our fields transformers' class lacks: hub (remote-code) keys we honour or validate, and the heads'.
    ours_only = ours_fields - set(hf_defaults) - {"rope", "extra"}
    hub_keys = {"deepseek_v2": {"scoring_func", "moe_layer_freq"},
                "deepseek_v3": {"scoring_func", "moe_layer_freq", "topk_method", "quantization_config",
                                "num_nextn_predict_layers"},  # transformers' num_mtp_layers (attribute_map)
                "stablelm": set()}[family]
    assert ours_only == hub_keys | {"num_labels", "classifier_dropout", "token_classification_bias"}
    if family == "deepseek_v3":
        assert ours.num_nextn_predict_layers == hf_defaults["num_mtp_layers"]
    # rope: transformers' instance default, through our parser, equals our dataclass default.
    assert RopeConfig.from_hf({"rope_parameters": dict(hf_cls().rope_parameters)}) == ours.rope
    # and a default-constructed transformers config, through from_hf, is our default config.
    assert config_from_hf(hf_cls().to_dict()).replace(extra=(), id2label=None) == ours


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_identity(family):
    cases = [CONFIG_CLASSES[family](),
             config_from_hf(hf_config(family).to_dict()),
             config_from_hf(hf_config(family, tie_word_embeddings=True, eos_token_id=[1, 2],
                                      architectures=[CONFIG_CLASSES[family].hf_class_prefix + "ForTokenClassification"],
                                      num_labels=3).to_dict())]
    cases.append(config_from_hf(HUB[family]))
    for cfg in cases:
        again = config_from_hf(json.loads(json.dumps(cfg.to_hf())))
        assert again == cfg
        assert hash(again) == hash(cfg)


def test_hub_configs_parse():
    v2, lm = config_from_hf(HUB_V2), config_from_hf(HUB_STABLELM)
    assert v2.q_lora_rank is None and v2.rope.rope_type == "yarn" and v2.rope.mscale_all_dim == 0.707
    assert v2.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * 0.707 * __import__("math").log(40) + 1) ** 2)
    assert lm.rope.partial_rotary_factor == 0.25 and lm.use_qkv_bias and lm.rotary_dim == 16


def test_hub_v3_config_parses_every_key():
    cfg = config_from_hf(HUB_V3)
    assert isinstance(cfg, DeepseekV3Config)
    assert cfg.rope == RopeConfig(rope_type="yarn", rope_theta=10000.0, factor=40.0,
                                  original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=1.0,
                                  mscale_all_dim=1.0)
    assert cfg.num_nextn_predict_layers == 1 and cfg.quantization_config.to_dict()["fmt"] == "e4m3"
    out = cfg.to_hf()
    # dict-valued keys come back as objects, not lists of pairs
    assert out["quantization_config"] == HUB_V3["quantization_config"]
    assert out["auto_map"] == HUB_V3["auto_map"]
    assert out["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("family", FAMILIES)
def test_to_hf_accepted_by_autoconfig(tmp_path, family):
    """to_hf() -> config.json -> transformers.AutoConfig: same class, and every shared field equal."""
    variants = [hf_config(family).to_dict(), HUB[family]]
    if family == "stablelm":
        variants.append(hf_config(family, use_qkv_bias=True, qk_layernorm=True, use_parallel_residual=True,
                                  rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0,
                                                   "partial_rotary_factor": 0.5}).to_dict())
    if family == "deepseek_v2":
        variants.append(hf_config(family, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                  q_lora_rank=None,
                                  rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                   "original_max_position_embeddings": 32, "mscale": 0.707,
                                                   "mscale_all_dim": 0.707, "beta_fast": 32,
                                                   "beta_slow": 1}).to_dict())
    for raw in variants:
        cfg = config_from_hf(raw)
        with open(tmp_path / "config.json", "w") as f:
            json.dump(cfg.to_hf(), f)
        hf = transformers.AutoConfig.from_pretrained(tmp_path)
        assert type(hf) is HF_CLASSES[family]
        compared = 0
        for f in dataclasses.fields(cfg):
            if f.name in ("rope", "extra", "quantization_config") or not hasattr(hf, f.name):
                continue
            theirs = getattr(hf, f.name)
            if f.name == "id2label":
                theirs = {str(k): v for k, v in theirs.items()}
                ours = (dict(cfg.id2label) if cfg.id2label is not None
                        else {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)})  # transformers' default names
                assert ours == theirs
            elif f.name == "architectures" and theirs is None:
                assert cfg.architectures == ()
            else:
                assert _norm(getattr(cfg, f.name)) == _norm(theirs), (f.name, getattr(cfg, f.name), theirs)
            compared += 1
        assert compared >= 15
        assert RopeConfig.from_hf({"rope_parameters": dict(hf.rope_parameters)},
                                  default_partial=cfg._default_partial_rotary()) == cfg.rope
        # transformers' view of the file we wrote, read back by us, is our config again.
        back = config_from_hf(hf.to_dict()).replace(extra=())
        if cfg.id2label is None:  # transformers names the default labels LABEL_i
            back = back.replace(id2label=None)
        assert back == cfg.replace(extra=())


LEGACY_ROPE = [
    None,
    {"type": "linear", "factor": 2.0},
    {"type": "dynamic", "factor": 3.0},
    {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
     "mscale": 0.707, "mscale_all_dim": 0.707},
    {"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 1.0},  # omax from max_position_embeddings
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("legacy", LEGACY_ROPE, ids=lambda r: "none" if r is None else r.get("type", "yarn2"))
def test_legacy_rope_keys(family, legacy):
    """`rope_theta` + `rope_scaling` (legacy) parse to the same RopeConfig as the equivalent
    `rope_parameters`, and as transformers' own standardisation of the legacy keys."""
    base = hf_config(family).to_dict()
    base.pop("rope_parameters")
    legacy_raw = {**base, "rope_theta": 50000.0, "rope_scaling": legacy}
    if family == "stablelm":
        legacy_raw["partial_rotary_factor"] = 0.5
    new_params = {"rope_theta": 50000.0}
    if legacy is not None:
        new_params.update({("rope_type" if k == "type" else k): v for k, v in legacy.items()})
    else:
        new_params["rope_type"] = "default"
    if family == "stablelm":
        new_params["partial_rotary_factor"] = 0.5
    ours_legacy = config_from_hf(legacy_raw)
    ours_new = config_from_hf({**base, "rope_parameters": new_params})
    assert ours_legacy == ours_new
    assert ours_legacy.rope.rope_theta == 50000.0
    if legacy is not None:
        assert ours_legacy.rope.rope_type == new_params["rope_type"]
        assert ours_legacy.rope.factor == legacy["factor"]
    if family == "stablelm":
        assert ours_legacy.rope.partial_rotary_factor == 0.5
    # transformers reads the same legacy keys into rope_parameters; ours agrees with it.
    hf = HF_CLASSES[family](**{k: v for k, v in legacy_raw.items() if k != "model_type"})
    assert RopeConfig.from_hf({"rope_parameters": dict(hf.rope_parameters)},
                              default_partial=CONFIG_CLASSES[family]._default_partial_rotary()) == ours_legacy.rope


def test_aliases_from_attribute_map():
    raw = hf_config("deepseek_v3").to_dict()
    raw.pop("num_nextn_predict_layers")
    raw["num_mtp_layers"] = 2
    assert config_from_hf(raw).num_nextn_predict_layers == 2
    raw = hf_config("deepseek_v2").to_dict()
    raw.pop("n_routed_experts")
    raw["num_experts"] = 16
    assert config_from_hf(raw).n_routed_experts == 16


@pytest.mark.parametrize("family,change,field", [
    ("deepseek_v3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_type"),
    ("stablelm", {"rope_parameters": {"rope_type": "su", "rope_theta": 1e4}}, "rope_type"),
    ("deepseek_v2", {"topk_method": "noaux_tc"}, "topk_method"),
    ("deepseek_v3", {"topk_method": "greedy"}, "topk_method"),
    ("deepseek_v2", {"scoring_func": "sigmoid"}, "scoring_func"),
    ("stablelm", {"hidden_act": "tanh"}, "hidden_act"),
    ("deepseek_v2", {"hidden_act": "mish"}, "hidden_act"),
    ("deepseek_v2", {"moe_layer_freq": 2}, "moe_layer_freq"),
    ("deepseek_v3", {"quantization_config": {"quant_method": "fp8", "fmt": "e5m2",
                                             "weight_block_size": [128, 128]}}, "quantization_config"),
    ("deepseek_v3", {"quantization_config": {"quant_method": "awq"}}, "quantization_config"),
    ("deepseek_v3", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4,
                                         "mystery": 1}}, "mystery"),
])
def test_unsupported_values_name_the_field(family, change, field):
    raw = {**hf_config(family).to_dict(), **change}
    with pytest.raises(ConfigError, match=field):
        config_from_hf(raw)


def test_unsupported_model_type_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"model_type='llama' is not supported.*deepseek_v2"):
        config_from_hf({"model_type": "llama"})
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)


def test_stablelm_default_partial_rotary():
    """transformers' StableLmConfig() rotates 25% of each head; so must ours, built directly or from json."""
    assert StableLmConfig().rope.partial_rotary_factor == 0.25
    raw = {k: v for k, v in hf_config("stablelm").to_dict().items() if k != "rope_parameters"}
    assert config_from_hf(raw).rope.partial_rotary_factor == 0.25
    assert DeepseekV2Config().rope.partial_rotary_factor == 1.0
