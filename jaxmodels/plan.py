"""`jaxmodels plan`: bytes per device of a model on a mesh, from abstract shapes only (no devices, no files).

    jaxmodels plan --model deepseek-v3 --mesh fsdp=32,expert=8 --batch 8 --seq 4096 --device-memory 80GB

Parameters are placed by the same rules table the model uses (`jaxmodels.sharding.RULES`); the AdamW
state is two float32 moments per trained parameter, placed like the parameter; the static cache is the
MLA latent (DeepSeek) or K/V (StableLM) cache for `batch` x `seq` tokens, placed by `CACHE_AXES`.
Activations and compiler temporaries are not counted: leave headroom for them.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

import jax.numpy as jnp
from flax import nnx

from jaxmodels import sharding
from jaxmodels.units import DTYPES, human_bytes, parse_size
from jaxmodels.config import BaseConfig, ConfigError, config_from_hf, load_config

# The real-size models this project names (`jaxmodels plan --model NAME`, the benchmarks): the published
# checkpoints' config.json fields, so that they need no files. The one list; PRESETS holds them as configs.
PRESET_CONFIGS: dict[str, dict] = {
    "deepseek-v3": dict(  # 671B; the MTP layer is not part of the planned model
        model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, first_k_dense_replace=3, num_attention_heads=128,
        num_key_value_heads=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8,
        topk_group=4, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128,
        v_head_dim=128, routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=163840,
        num_nextn_predict_layers=1,
        rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                          mscale=1.0, mscale_all_dim=1.0), rope_theta=10000, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1,
    ),
    "deepseek-v2": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=5120, intermediate_size=12288,
        moe_intermediate_size=1536, num_hidden_layers=60, num_attention_heads=128, num_key_value_heads=128,
        n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512,
        q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
        topk_method="group_limited_greedy", n_group=8, topk_group=3, routed_scaling_factor=16.0,
        max_position_embeddings=163840,
        rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                          mscale=0.707, mscale_all_dim=0.707), rope_theta=10000,
    ),
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
        kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
        topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0,
        scoring_func="softmax", max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                          mscale=0.707, mscale_all_dim=0.707), rope_theta=10000, bos_token_id=100000,
        eos_token_id=100001,
    ),
    "stablelm-3b": dict(  # stablelm-3b-4e1t
        model_type="stablelm", vocab_size=50304, hidden_size=2560, intermediate_size=6912, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, partial_rotary_factor=0.25, rope_theta=10000,
        max_position_embeddings=4096, layer_norm_eps=1e-5, use_qkv_bias=False, qk_layernorm=False,
        use_parallel_residual=False, hidden_act="silu", tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
    ),
    "stablelm-2-1.6b": dict(
        model_type="stablelm", vocab_size=100352, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
        num_attention_heads=32, num_key_value_heads=32, partial_rotary_factor=0.25, use_qkv_bias=True,
        max_position_embeddings=4096,
    ),
}
PRESETS: dict[str, BaseConfig] = {name: config_from_hf(raw) for name, raw in PRESET_CONFIGS.items()}


def resolve_model(name_or_path: str) -> BaseConfig:
    """A preset name, a checkpoint directory holding config.json, or a config.json path."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    if os.path.exists(name_or_path):
        return load_config(name_or_path)
    raise ConfigError(f"--model {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a path to a "
                      "checkpoint directory / config.json")


@dataclass
class Plan:
    config: BaseConfig
    mesh: dict[str, int]
    num_params: int
    params: int  # bytes per device
    optimizer: int
    gradients: int
    cache: int
    largest: tuple[str, tuple[int, ...], tuple[int, ...]]  # (name, global shape, per-device shape)

    @property
    def inference(self) -> int:
        return self.params + self.cache

    @property
    def training(self) -> int:
        return self.params + self.gradients + self.optimizer


def make_plan(cfg: BaseConfig, mesh: dict[str, int], *, batch: int = 1, seq: int = 4096, dtype=jnp.bfloat16,
              cache_dtype=None, rules=None, mtp_layers: int = 0) -> Plan:
    """Bytes per device of parameters, AdamW state, gradients and the static cache (shapes only).
    mtp_layers: DeepSeek-V3 multi-token-prediction layers loaded with the model (0: none)."""
    from jaxmodels.cache import cache_shapes
    from jaxmodels.model import abstract_model

    mesh = {a: int(mesh.get(a, 1)) for a in sharding.MESH_AXES}
    state = nnx.state(abstract_model(cfg, dtype, num_mtp_layers=mtp_layers))
    num = params = optimizer = gradients = 0
    largest = ("", (), ())
    best = -1
    for path, var in nnx.to_flat_state(state):
        axes = sharding.var_axes(var)
        spec = sharding.logical_to_spec(axes, rules, mesh, tuple(var.shape))
        local = sharding.shard_shape(tuple(var.shape), spec, mesh)
        n_local = math.prod(local)
        params += n_local * jnp.dtype(var.dtype).itemsize
        if isinstance(var, nnx.Param):
            num += math.prod(var.shape)
            optimizer += 2 * 4 * n_local  # AdamW mu and nu in float32
            gradients += n_local * jnp.dtype(var.dtype).itemsize
        if n_local > best:
            best, largest = n_local, (".".join(map(str, path)), tuple(var.shape), local)
    cache = 0
    if batch and seq:
        cdtype = jnp.dtype(cache_dtype or dtype)
        stacks = ({"dense_layers": cfg.num_dense_layers, "moe_layers": cfg.num_moe_layers}
                  if hasattr(cfg, "num_moe_layers") else {"layers": cfg.num_hidden_layers})
        for n in stacks.values():
            if not n:
                continue
            for field, shape in cache_shapes(cfg, n, batch, seq).items():
                cache += sharding.bytes_per_device(shape, cdtype, sharding.CACHE_AXES[field], mesh, rules)
    return Plan(cfg, mesh, num, params, optimizer, gradients, cache, largest)


def format_plan(plan: Plan, *, batch: int, seq: int, dtype_name: str, device_memory: int | None) -> str:
    cfg = plan.config
    n_dev = math.prod(plan.mesh.values())
    lines = [
        f"model        {cfg.model_type}: {plan.num_params / 1e9:.2f}B parameters ({dtype_name}), "
        f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}"
        + (f", {cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}" if getattr(cfg, "is_moe", False) else ""),
        f"mesh         {sharding.describe(plan.mesh)} ({n_dev} devices)",
        f"largest      {plan.largest[0]} {list(plan.largest[1])} -> {list(plan.largest[2])} per device",
        "",
        "per device",
        f"  parameters              {human_bytes(plan.params):>12}",
        f"  gradients               {human_bytes(plan.gradients):>12}",
        f"  AdamW state (2 x fp32)  {human_bytes(plan.optimizer):>12}",
        f"  static cache            {human_bytes(plan.cache):>12}   (batch {batch} x {seq} tokens)",
        f"  inference: params + cache               {human_bytes(plan.inference):>12}",
        f"  training:  params + grads + AdamW       {human_bytes(plan.training):>12}",
        "  (activations and compiler temporaries not included)",
    ]
    if device_memory:
        lines.append("")
        for what, need in (("inference", plan.inference), ("training", plan.training)):
            verdict = "fits" if need <= device_memory else "does NOT fit"
            lines.append(f"{what:<10} {verdict} in {human_bytes(device_memory)} per device "
                         f"({100 * need / device_memory:.0f}% used)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help=f"a preset ({', '.join(PRESETS)}), a checkpoint directory or a config.json")
    parser.add_argument("--mesh", default="", help="mesh axis sizes, e.g. fsdp=64,expert=8 (missing axes are 1)")
    parser.add_argument("--batch", type=int, default=1, help="batch size for the static cache")
    parser.add_argument("--seq", type=int, default=4096, help="cache length (prompt + new tokens)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="parameter dtype")
    parser.add_argument("--cache-dtype", default=None, choices=sorted(DTYPES), help="default: --dtype")
    parser.add_argument("--device-memory", default=None, help="memory per device, e.g. 80GB or 141GiB")
    parser.add_argument("--mtp", action="store_true",
                        help="count the config's num_nextn_predict_layers multi-token-prediction layers (DeepSeek-V3 "
                             "releases ship them and from_pretrained loads them)")
    parser.add_argument("--rules", default="",
                        help="overrides of the rules table, e.g. 'embed=fsdp+tensor,vocab=' (+ joins axes, "
                             "empty = replicated)")


def parse_rules(text: str) -> dict:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, _, v = part.partition("=")
        axes = tuple(a for a in v.split("+") if a)
        out[k.strip()] = None if not axes else axes[0] if len(axes) == 1 else axes
    return out


def run(args) -> int:
    try:
        cfg = resolve_model(args.model)
        mesh = sharding.parse_mesh(args.mesh)
        dev_mem = parse_size(args.device_memory, "--device-memory") if args.device_memory else None
        dtype = DTYPES[args.dtype]
        plan = make_plan(cfg, mesh, batch=args.batch, seq=args.seq, dtype=dtype,
                         cache_dtype=DTYPES[args.cache_dtype] if args.cache_dtype else None,
                         rules=parse_rules(args.rules),
                         mtp_layers=getattr(cfg, "num_nextn_predict_layers", 0) or 0 if args.mtp else 0)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"jaxmodels plan: {e}", file=sys.stderr)
        return 2
    print(format_plan(plan, batch=args.batch, seq=args.seq, dtype_name=args.dtype, device_memory=dev_mem))
    if dev_mem is not None and plan.inference > dev_mem:
        return 1
    return 0
