"""`jaxmodels plan`: bytes per device of a model on a mesh, from abstract shapes only (no devices, no files).

    jaxmodels plan --model deepseek-v3 --mesh fsdp=32,expert=8 --batch 8 --seq 4096 --device-memory 80GB

Parameters are placed by the same rules table the model uses (`jaxmodels.sharding.RULES`); the AdamW
state is two float32 moments per trained parameter, placed like the parameter; the static cache is the
MLA latent (DeepSeek) or K/V (StableLM) cache for `batch` x `seq` tokens, placed by `CACHE_AXES`.
With --train, the estimate adds the training step's activations and temporaries (`train_activations`).

With --compile and --topology, the real programs are compiled for a TPU slice or GPU nodes on this machine
(nothing allocated, no checkpoint; jaxmodels.pods) and their per-chip memory, FLOPs, estimated step time,
collectives and kernels are printed beside the estimate:

    jaxmodels plan --model deepseek-v3 --topology v5p-256 --train --batch 128 --seq 4096 --compile
    jaxmodels plan --model deepseek-v2-lite --topology h100x8 --generate --batch 64 --seq 8192 --compile
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import jax
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
              cache_dtype=None, rules=None, mtp_layers: int = 0, lora_rank: int | None = None,
              moment_dtype=jnp.float32) -> Plan:
    """Bytes per device of parameters, AdamW state, gradients and the static cache (shapes only).
    mtp_layers: DeepSeek-V3 multi-token-prediction layers loaded with the model (0: none). lora_rank: LoRA
    adapters on the trainer's default targets, the only trained parameters (gradients and AdamW state for them
    alone). moment_dtype: AdamW's mu and nu (the trainer's --optimizer-dtype)."""
    from jaxmodels.cache import cache_shapes
    from jaxmodels.layers.linear import LoRAParam
    from jaxmodels.model import abstract_model
    from jaxmodels.pods import abstract_model as abstract_lora_model

    mesh = {a: int(mesh.get(a, 1)) for a in sharding.MESH_AXES}
    model = (abstract_lora_model(cfg, dtype, lora_rank) if lora_rank else
             abstract_model(cfg, dtype, num_mtp_layers=mtp_layers))
    state = nnx.state(model)
    trained = LoRAParam if lora_rank else nnx.Param
    num = params = optimizer = gradients = 0
    largest = ("", (), ())
    best = -1
    for path, var in nnx.to_flat_state(state):
        axes = sharding.var_axes(var)
        spec = sharding.logical_to_spec(axes, rules, mesh, tuple(var.shape))
        local = sharding.shard_shape(tuple(var.shape), spec, mesh)
        n_local = math.prod(local)
        itemsize = jnp.dtype(var.dtype).itemsize
        params += n_local * itemsize
        if isinstance(var, nnx.Param) and not isinstance(var, LoRAParam):
            num += math.prod(var.shape)
        if isinstance(var, trained):
            optimizer += n_local * 2 * jnp.dtype(moment_dtype).itemsize  # AdamW mu and nu
            gradients += n_local * itemsize
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


# Live copies of one MoE layer's local expert weights (bf16) in the backward pass of a compiled step: the forward's
# gather recomputed, the backward's gather and its transposed copy for the input gradient, the weight gradient
# before its reduce-scatter. Read off DeepSeek-V3's step on a v5p-256 (benchmarks/RESULTS.md, Pods).
LAYER_COPIES = 6
# ... of a dense layer's weights: the forward's gather recomputed, the backward's, the gradient before its
# reduce-scatter (stablelm-3b on a v5e-8 / v6e-8, same source).
DENSE_LAYER_COPIES = 3
# Live [slots of one chunk, hidden]-sized bf16 buffers of the MoE dispatch at its peak (same source).
DISPATCH_COPIES = 12


def train_activations(cfg: BaseConfig, mesh: dict[str, int], *, batch: int, seq: int, remat: str = "full",
                      grad_accum: int = 1, fused_attention: bool = True, rules=None) -> dict[str, int]:
    """Bytes per device the training step holds besides parameters, gradients and optimizer state (estimate).

    batch: rows per optimizer step (global), split into grad_accum micro-batches, each over the mesh's batch
    axes. Parts, each read off the buffers of compiled steps (`jaxmodels plan --compile`; the constants are the
    number of live copies seen there):
      residuals  what the layer scan saves for the backward pass: each layer's input (remat "full"), the
                 projections' outputs too ("save_matmuls"), everything ("none");
      layer      one layer's weights gathered over FSDP (bf16): LAYER_COPIES of a MoE layer's local experts,
                 DENSE_LAYER_COPIES of a dense layer's weights;
      dispatch   the MoE dispatch of one chunk of the expert group's token-slots (jaxmodels.layers.moe
                 MAX_SLOTS_PER_CHUNK): the gathered tokens, sorted copies and their expert activations;
      head       one loss chunk (train.loss): float32 logits and their gradient, and under a mesh the chunk's
                 hidden states gathered over the batch's devices (the vocabulary-parallel loss,
                 jaxmodels.layers.vocab: no device holds the whole table);
      attention  the [queries, keys] scores when no fused kernel runs.
    """
    from jaxmodels.layers import vocab as vocab_lib
    from jaxmodels.layers.moe import MAX_SLOTS_PER_CHUNK
    from jaxmodels.train.loss import CHUNK_ELEMENTS, chunk_len
    mesh = {a: int(mesh.get(a, 1)) for a in sharding.MESH_AXES}
    micro = batch // max(grad_accum, 1)
    axes = vocab_lib.batch_axes(mesh, rules, micro)  # those that divide the micro-batch
    ways = math.prod(mesh[a] for a in axes)
    rows = -(-micro // ways)
    tokens = rows * seq
    d, bf16, f32 = cfg.hidden_size, 2, 4
    tensor, expert = mesh["tensor"], mesh["expert"]
    heads = cfg.num_attention_heads
    if hasattr(cfg, "kv_lora_rank"):
        qk, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
        attn_widths = ((cfg.q_lora_rank or 0) + heads * qk + cfg.kv_lora_rank + cfg.qk_rope_head_dim
                       + heads * (qk - cfg.qk_rope_head_dim + v) + d)
    else:
        qk = v = cfg.head_dim
        attn_widths = heads * qk + 2 * cfg.num_key_value_heads * qk + d
    moe = getattr(cfg, "is_moe", False) and getattr(cfg, "num_moe_layers", 0) > 0
    mlp_widths = 2 * cfg.intermediate_size + d
    if moe:
        k, mi = cfg.num_experts_per_tok, cfg.moe_intermediate_size
        mlp_widths = k * (2 * mi + d) + (cfg.n_shared_experts or 0) * 2 * mi + d
    per_layer = d * bf16  # the layer's input
    if remat != "full":
        per_layer += (attn_widths + mlp_widths) * bf16 * (2 if remat == "none" else 1)
    out = {"residuals": cfg.num_hidden_layers * tokens * per_layer}
    if moe:
        local = cfg.n_routed_experts // expert if cfg.n_routed_experts % expert == 0 else cfg.n_routed_experts
        # Not split over FSDP (its axes of size 1), the local experts are used where they lie: one transposed copy.
        gathered = math.prod(mesh[a] for a in sharding.mesh_axes_of("expert_embed", rules, mesh)) > 1
        copies = LAYER_COPIES if gathered else 1
        out["layer"] = copies * local * 3 * d * cfg.moe_intermediate_size / tensor * bf16
        slots = min(tokens * expert * cfg.num_experts_per_tok, MAX_SLOTS_PER_CHUNK)
        out["dispatch"] = DISPATCH_COPIES * slots * d * bf16
    else:
        out["layer"] = DENSE_LAYER_COPIES * _layer_params(cfg) / tensor * bf16
        out["dispatch"] = 0
    vocab = cfg.vocab_size
    if ways > 1 and vocab % ways == 0:  # vocabulary-parallel: all rows of a chunk, this device's vocabulary slice
        c = chunk_len(seq, micro * max(vocab // ways, d), CHUNK_ELEMENTS)
        out["head"] = 3 * micro * c * (vocab // ways * f32 + d * bf16)
    else:
        c = chunk_len(seq, rows * vocab, CHUNK_ELEMENTS)
        out["head"] = 3 * rows * c * vocab // tensor * f32 + (2 * vocab * d * bf16 if ways > 1 else 0)
    if not fused_attention:
        out["attention"] = 3 * rows * heads // tensor * seq * seq * f32
    return {k: int(x) for k, x in out.items()}


def _layer_params(cfg: BaseConfig) -> float:
    """Parameters of the largest layer (a MoE layer's routed experts included)."""
    d = cfg.hidden_size
    if hasattr(cfg, "kv_lora_rank"):
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        q = (d * cfg.q_lora_rank + cfg.q_lora_rank * cfg.num_attention_heads * qk if cfg.q_lora_rank
             else d * cfg.num_attention_heads * qk)
        attn = q + d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * cfg.num_attention_heads * (
            cfg.qk_nope_head_dim + cfg.v_head_dim) + cfg.num_attention_heads * cfg.v_head_dim * d
    else:
        attn = d * cfg.head_dim * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    if getattr(cfg, "is_moe", False) and getattr(cfg, "num_moe_layers", 0):
        mlp = 3 * d * cfg.moe_intermediate_size * (cfg.n_routed_experts + (cfg.n_shared_experts or 0))
    else:
        mlp = 3 * d * cfg.intermediate_size
    return attn + mlp


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
    # ---- training / generation programs, compiled for a topology (jaxmodels.pods) ----
    parser.add_argument("--topology", default=None,
                        help="chips to plan for: a TPU slice (v4-8, v5p-128, v5e-8, v6e-8, or v5p:4x4x4; v4/v5p-N "
                             "count TensorCores, 2 per chip) or GPU nodes (h100x8, h100x8x4 = 4 nodes of 8)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the real programs for --topology on this machine (TPU: needs libtpu, "
                             "pip install 'jaxmodels[tpu-plan]'; GPU: jax's CUDA plugin) and print their memory, "
                             "FLOPs, estimated step time, collectives and kernels")
    parser.add_argument("--train", action="store_true", help="plan the training step (with --batch rows of --seq)")
    parser.add_argument("--generate", action="store_true",
                        help="plan generation: prefill of --prompt-len tokens and a decode step over --seq slots")
    parser.add_argument("--search", action="store_true",
                        help="with --compile: try mesh shapes (and remat policies, micro-batches) and print the best "
                             "that fits")
    parser.add_argument("--search-limit", type=int, default=6,
                        help="--search: compile at most this many candidates (those the planner's estimate does not "
                             "rule out, fewest micro-batches and least recompute first)")
    parser.add_argument("--lora-rank", type=int, default=None, help="train LoRA adapters of this rank (frozen bf16 base)")
    parser.add_argument("--remat", default="full", help="the training step's remat policy (jaxmodels train --remat)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (--batch rows in all)")
    parser.add_argument("--param-dtype", default=None, choices=["float32", "bf16"],
                        help="--train: the trained weights' dtype (default: float32 master weights; a LoRA base is "
                             "bf16), as jaxmodels train --param-dtype")
    parser.add_argument("--optimizer-dtype", default="float32", choices=["float32", "bf16"],
                        help="--train: AdamW's moments, as jaxmodels train --optimizer-dtype")
    parser.add_argument("--prompt-len", type=int, default=None, help="--generate: prompt length (default --seq / 2)")


def parse_rules(text: str) -> dict:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, _, v = part.partition("=")
        axes = tuple(a for a in v.split("+") if a)
        out[k.strip()] = None if not axes else axes[0] if len(axes) == 1 else axes
    return out


def run(args) -> int:
    if args.topology and args.topology.strip().lower().startswith(("h100", "h200")):
        # Compile-only GPUs: jax's CUDA plugin must not look for a GPU or CUDA libraries (before jax picks a backend).
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
        jax.config.update("jax_platforms", os.environ.get("JAX_PLATFORMS") or "cpu")
    try:
        cfg = resolve_model(args.model)
        mesh = sharding.parse_mesh(args.mesh)
        dev_mem = parse_size(args.device_memory, "--device-memory") if args.device_memory else None
        dtype = DTYPES[args.dtype]
        if args.compile or args.topology or args.train or args.generate or args.search:
            return run_programs(args, cfg, mesh, dev_mem)
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


# --------------------------------------------------------------------------------------------------------
# Training and generation programs on a topology (--train / --generate, --compile, --search)
# --------------------------------------------------------------------------------------------------------

FIT_FRACTION = 0.9  # a plan "fits" with at most this share of HBM: runtime buffers and fragmentation need the rest


@dataclass
class Case:
    """One program configuration: what --search varies, and what its estimate / compile said."""

    mesh: dict[str, int]
    remat: str
    grad_accum: int
    estimate: dict[str, int] | None = None
    compiled: dict[str, Any] | None = None  # program name -> pods.Compiled
    cost: tuple[float, float, float] | None = None  # (FLOPs, bytes accessed, compile seconds) at full depth


def _estimate(cfg, case: Case, args, topo) -> dict[str, int]:
    """The planner's analytic bytes per chip of this case (parameters, gradients, optimizer, activations)."""
    lora = args.lora_rank
    plan = make_plan(cfg, case.mesh, batch=0, seq=0, dtype=_param_dtype(args), rules=parse_rules(args.rules),
                     lora_rank=lora, moment_dtype=DTYPES[args.optimizer_dtype])
    if args.train:
        acts = train_activations(cfg, case.mesh, batch=args.batch, seq=args.seq, remat=case.remat,
                                 grad_accum=case.grad_accum, fused_attention=topo.platform in ("tpu", "gpu"),
                                 rules=parse_rules(args.rules))
        # The step differentiates the weights as the forward pass uses them (cast to bf16 once, before the layer
        # scan: train.step.compute_params), so the gradients of float32 weights are bf16 until the optimizer's
        # fused update reads them. Gradient accumulation keeps one more buffer (the running sum).
        # ... and that bf16 copy of the trained float32 weights lives through the forward and backward passes.
        copy = plan.gradients // 2 if _param_dtype(args) == jnp.float32 else 0
        grads = plan.gradients // (2 if _param_dtype(args) == jnp.float32 else 1)
        grads *= 2 if case.grad_accum > 1 else 1
        return dict(parameters=plan.params, gradients=grads, optimizer=plan.optimizer, compute_copy=copy, **acts)
    cache_plan = make_plan(cfg, case.mesh, batch=args.batch, seq=args.seq, dtype=jnp.bfloat16,
                           rules=parse_rules(args.rules))
    return dict(parameters=cache_plan.params, cache=cache_plan.cache)


def _programs(cfg, case: Case, args, mesh, scan: bool = True) -> dict[str, tuple]:
    from jaxmodels import pods
    rules = parse_rules(args.rules) or None
    if args.train:
        setup = pods.TrainSetup(batch=args.batch // case.grad_accum, seq=args.seq, grad_accum=case.grad_accum,
                                remat=case.remat, lora_rank=args.lora_rank, param_dtype=_param_dtype(args),
                                moment_dtype=DTYPES[args.optimizer_dtype])
        return {"train step": pods.train_program(cfg, mesh, setup, scan=scan, rules=rules)}
    prompt = args.prompt_len or args.seq // 2
    progs = pods.generate_programs(cfg, mesh, batch=args.batch, prompt=prompt, cache_len=args.seq, scan=scan,
                                   rules=rules)
    return {f"prefill {args.batch}x{prompt}": progs["prefill"], f"decode step ({args.seq} slots)": progs["decode"]}


def _builder(cfg, case: Case, args, mesh):
    """build(cfg, scan) -> (jitted, args) of the case's training step, for pods.estimate_cost."""
    return lambda c, scan: list(_programs(c, case, args, mesh, scan).values())[0]


def _shortlist(cases: list[Case], args, hbm: int) -> list[Case]:
    """--search: the candidates worth compiling. Those whose planner estimate is over the bar by more than the
    planner's error (15%) are dropped; of the rest, the --search-limit with the fewest micro-batches, the least
    recompute and the least tensor parallelism (the cheapest steps, all else equal) are compiled."""
    recompute = {"none": 0, "save_matmuls": 1, "full": 2}
    keep = [c for c in cases if sum(c.estimate.values()) <= 1.15 * FIT_FRACTION * hbm]
    keep.sort(key=lambda c: (c.grad_accum, recompute.get(c.remat, 3), c.mesh["tensor"], sum(c.estimate.values())))
    chosen = keep[:max(1, args.search_limit)]
    print(f"search       {len(cases)} candidates; {len(cases) - len(keep)} ruled out by the planner's estimate "
          f"(over {100 * FIT_FRACTION:.0f}% of HBM by more than its 15% error); compiling {len(chosen)} "
          f"(--search-limit {args.search_limit})", flush=True)
    return chosen or cases[:1]


def _param_dtype(args):
    """The trained model's weight dtype, as the trainer picks it: --param-dtype, else float32 (bf16 for the
    frozen base of a LoRA run)."""
    if args.param_dtype:
        return DTYPES[args.param_dtype]
    return jnp.bfloat16 if args.lora_rank else jnp.float32


def _candidates(cfg, args, topo) -> list[Case]:
    """--search: mesh shapes (experts over 1..min(chips, 16), tensor 1..8 within a node or 4x4 ICI group, FSDP the
    rest) x remat policies x micro-batches. Without --search: the given --mesh / --remat / --grad-accum."""
    from jaxmodels import pods
    given = sharding.parse_mesh(args.mesh) if args.mesh else pods.default_mesh(cfg, topo.chips)
    base = [Case(dict(given), args.remat, args.grad_accum)]
    if not args.search:
        return base
    n = topo.chips
    experts = [1]
    if getattr(cfg, "is_moe", False):
        experts = [e for e in (1, 2, 4, 8, 16) if e <= n and cfg.n_routed_experts % e == 0 and n % e == 0]
    meshes = []
    for e in experts:
        for t in (1, 2, 4, 8):
            if t > 1 and (cfg.num_attention_heads % t or n % (e * t)):
                continue
            if n % (e * t):
                continue
            meshes.append({"data": 1, "fsdp": n // (e * t), "expert": e, "tensor": t})
    remats = [args.remat] + [r for r in ("full", "save_matmuls") if r != args.remat] if args.train else [args.remat]
    accums = [a for a in (args.grad_accum, 2 * args.grad_accum) if args.batch % a == 0] if args.train else [1]
    out = []
    for m in meshes:
        for r in remats:
            for a in accums:
                out.append(Case(m, r, a))
    return out


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds >= 0.1 else f"{seconds * 1e3:.3g} ms"


def _fmt_gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else human_bytes(n)


def run_programs(args, cfg, mesh_sizes, dev_mem) -> int:
    """--train / --generate with --topology (and --compile, --search): estimate and compiled figures."""
    from jaxmodels import pods
    if args.train == args.generate:
        raise ValueError("say which program to plan: --train or --generate")
    if args.topology is None:
        raise ValueError("--train / --generate / --compile need --topology (e.g. v5p-128, v5e-8, h100x8)")
    if args.search and not args.compile:
        raise ValueError("--search compiles every candidate: add --compile")
    if args.grad_accum < 1 or args.batch % args.grad_accum:
        raise ValueError(f"--batch {args.batch} must split into --grad-accum {args.grad_accum} micro-batches")
    from jaxmodels.model import REMAT_POLICIES
    if args.remat not in REMAT_POLICIES:
        raise ValueError(f"--remat {args.remat!r} is not a policy; use one of {sorted(REMAT_POLICIES)}")
    topo = pods.parse_topology(args.topology)
    hbm = dev_mem or topo.hbm
    cases = _candidates(cfg, args, topo)
    lines = [f"model        {cfg.model_type}: {_describe_model(cfg)}",
             f"topology     {topo.description}; {_fmt_gib(hbm)} HBM and {topo.peak_flops / 1e12:.0f} TFLOP/s (bf16) "
             f"per chip"]
    what = (f"train step: {args.batch} rows x {args.seq} tokens ({args.grad_accum} micro-batch(es)), "
            + (f"LoRA rank {args.lora_rank} over a bf16 base" if args.lora_rank else
               f"full fine-tuning, {jnp.dtype(_param_dtype(args)).name} weights, {args.optimizer_dtype} AdamW "
               "moments") if args.train else
            f"generation: batch {args.batch}, cache {args.seq} slots, prompt {args.prompt_len or args.seq // 2}")
    lines.append(f"program      {what}")
    print("\n".join(lines), flush=True)
    if args.mesh:
        pods.make_mesh(topo, cases[0].mesh)  # a mesh that does not fit the chips: the clear error now
    for case in cases:
        case.estimate = _estimate(cfg, case, args, topo)
    if not args.compile:
        case = cases[0]
        _print_case(case, args, topo, hbm, cfg)
        return 0 if sum(case.estimate.values()) <= FIT_FRACTION * hbm else 1
    if args.search:
        cases = _shortlist(cases, args, hbm)
    for i, case in enumerate(cases):
        try:
            mesh = pods.make_mesh(topo, case.mesh)
        except pods.TopologyError as e:
            print(f"  skip {sharding.describe(case.mesh)}: {e}")
            continue
        case.compiled = {name: pods.compile_program(jitted, a) for name, (jitted, a) in
                         _programs(cfg, case, args, mesh).items()}
        if not args.search:  # the memory verdict now; the step-time estimate (more compiles) follows
            print("  compiled: " + "; ".join(
                f"{name} " + (c.error[:200] if c.error else
                              f"{_fmt_gib(c.peak)} per chip ({100 * c.peak / hbm:.0f}% of HBM) in {c.compile_s:.0f} s")
                for name, c in case.compiled.items()), flush=True)
        if args.search:
            print(f"  [{i + 1}/{len(cases)}] {_case_name(case, args)}: " + "; ".join(
                f"{name} " + (c.error[:80] if c.error else f"{_fmt_gib(c.peak)} ({100 * c.peak / hbm:.0f}%)")
                for name, c in case.compiled.items()), flush=True)
    fitting = [c for c in cases if c.compiled and all(not p.error and p.peak <= FIT_FRACTION * hbm
                                                      for p in c.compiled.values())]
    best = None
    if args.search:
        if not fitting:
            print("\nno candidate fits: " + _advice(cases[0], args, hbm))
            return 1
        # Training: ranked by the full-depth estimate (the scanned programs count a loop body once, and candidates
        # differ in their loops' trip counts: MoE and loss chunks); generation by the scanned programs' counts.
        if args.train:
            for c in fitting:
                try:
                    c.cost = pods.estimate_cost(_builder(cfg, c, args, pods.make_mesh(topo, c.mesh)), cfg,
                                                progress=True)
                    print(f"  {_case_name(c, args)}: estimated step {_fmt_s(_step_seconds(c, args, topo, cfg))}",
                          flush=True)
                except pods.TopologyError as e:
                    print(f"  {_case_name(c, args)}: no step-time estimate ({e})")
        best = min(fitting, key=lambda c: _step_seconds(c, args, topo, cfg) if c.cost else
                   sum(pods.roofline(p.flops, p.bytes_accessed, topo) for p in c.compiled.values()))
        print(f"\nbest of {len(cases)} compiled candidates (by the estimated step time): {_case_name(best, args)}")
    case = best or cases[0]
    if args.train and case.cost is None and case.compiled and all(not p.error for p in case.compiled.values()):
        try:
            case.cost = pods.estimate_cost(_builder(cfg, case, args, pods.make_mesh(topo, case.mesh)), cfg,
                                           progress=True)
        except pods.TopologyError as e:
            print(f"  no step-time estimate: {e}")
    _print_case(case, args, topo, hbm, cfg)
    return 0 if _fits(case, hbm) else 1


def _describe_model(cfg) -> str:
    plan = make_plan(cfg, {}, batch=0, seq=0)
    extra = (f", {cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}" if getattr(cfg, "is_moe", False) else "")
    n = plan.num_params
    count = f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"
    return f"{count} parameters, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}{extra}"


def _case_name(case: Case, args) -> str:
    out = f"mesh {sharding.describe(case.mesh)}"
    if args.train:
        out += f", remat {case.remat}, {case.grad_accum} micro-batch(es)"
    return out


def _fits(case: Case, hbm: int) -> bool:
    if case.compiled:
        return all(not p.error and p.peak <= FIT_FRACTION * hbm for p in case.compiled.values())
    return sum(case.estimate.values()) <= FIT_FRACTION * hbm


def _advice(case: Case, args, hbm: int) -> str:
    est = case.estimate or {}
    state = est.get("parameters", 0) + est.get("optimizer", 0) + est.get("gradients", 0)
    if state > FIT_FRACTION * hbm:
        fixes = ["more chips (a larger --topology)"]
        if args.train and not args.lora_rank:
            fixes += ["--lora-rank 16", "--optimizer-dtype bf16" if args.optimizer_dtype != "bf16" else None]
        return ("parameters, gradients and optimizer state alone need "
                f"{_fmt_gib(state)} per chip: " + ", or ".join(f for f in fixes if f))
    fixes = []
    if args.train:
        if case.remat != "full":
            fixes.append("--remat full")
        fixes.append(f"--grad-accum {case.grad_accum * 2} (smaller micro-batches)")
    fixes.append("a smaller --batch")
    if not args.search:
        fixes.append("--search")
    return "activations and temporaries are what does not fit: try " + ", ".join(fixes)


def _print_case(case: Case, args, topo, hbm: int, cfg) -> None:
    from jaxmodels import pods
    est = case.estimate
    total_est = sum(est.values())
    lines = ["", f"mesh         {sharding.describe(case.mesh)} ({topo.chips} chips)"
             + (f"; remat {case.remat}, {case.grad_accum} micro-batch(es)" if args.train else "")]
    parts = ", ".join(f"{k} {_fmt_gib(v)}" for k, v in est.items())
    lines.append(f"planner      {_fmt_gib(total_est)} per chip ({100 * total_est / hbm:.0f}% of HBM): {parts}")
    tokens = args.batch * args.seq
    if case.compiled:
        for name, c in case.compiled.items():
            lines.append(f"\n[{name}]")
            if c.error:
                lines.append(f"  compiler     refused after {c.compile_s:.0f} s: {c.error}")
                continue
            lines.append(f"  compiled     in {c.compile_s:.0f} s")
            lines.append(f"  per chip     arguments {_fmt_gib(c.arguments)} | temporaries {_fmt_gib(c.temporaries)} | "
                         f"outputs {_fmt_gib(c.outputs)} ({_fmt_gib(c.aliased)} of them written into donated arguments)")
            lines.append(f"  peak         {_fmt_gib(c.peak)} of {_fmt_gib(hbm)} HBM ({100 * c.peak / hbm:.0f}%); "
                         f"planner {_fmt_gib(total_est)} (compiled / planner = {c.peak / max(total_est, 1):.2f})")
            coll = pods.collectives(c.hlo)
            if coll:
                lines.append("  collectives  " + "; ".join(f"{op} x{n} {_fmt_gib(b)}" for op, (n, b) in coll.items())
                             + " per chip per program")
            ks = pods.kernels(c.hlo)
            lines.append("  kernels      " + (", ".join(f"{k} x{n}" for k, n in ks.items()) if ks else "XLA only"))
        if case.cost and args.train:
            flops, moved, spent = case.cost
            model_flops = _model_flops(cfg, args, tokens)
            lines.append(f"\n  FLOPs        {flops / 1e12:.1f} TFLOP and {moved / 1e9:.0f} GB of HBM traffic per chip "
                         "per "
                         f"step (compiler's counts, extrapolated to {cfg.num_hidden_layers} layers); model FLOPs "
                         f"{model_flops / topo.chips / 1e12:.1f} TFLOP per chip")
            seconds = _step_seconds(case, args, topo, cfg)
            step = next(iter(case.compiled.values()))
            kernel_s = seconds - pods.roofline(flops, moved, topo)
            mfu = model_flops / (seconds * topo.peak_flops * topo.chips)
            lines.append(f"  step time    {_fmt_s(seconds)} ESTIMATE: the compiler's counts at peak FLOP/s or HBM "
                         f"bandwidth, whichever binds ({_fmt_s(seconds - kernel_s)}; 1-2 layer programs extrapolated "
                         "to the full "
                         f"depth, {spent:.0f} s of compiles)"
                         + (f" + splash attention at peak FLOP/s {_fmt_s(kernel_s)}" if kernel_s else "")
                         + "; collectives assumed overlapped")
            lines.append(f"  MFU          {100 * mfu:.0f}% (estimate: model FLOPs / (estimated time x peak x chips)), "
                         f"{tokens / seconds:,.0f} tokens/s")
            if any("ragged-dot" in k for k in pods.kernels(step.hlo)):
                lines.append("  caution      XLA counts each MoE grouped matmul over every token-slot it is given (the "
                             "expert group's, most routed elsewhere) and its weight gradient as one dense matmul per "
                             "local expert (17x a dense matmul's FLOPs for 16 groups): for MoE models this estimate "
                             "is pessimistic by as much as the TPU kernels skip that work")
    verdict = "fits" if _fits(case, hbm) else "does NOT fit"
    refused = [c.error for c in (case.compiled or {}).values() if c.error]
    failed = [c.error for c in (case.compiled or {}).values() if c.error and not c.out_of_memory]
    peak = max((c.peak for c in (case.compiled or {}).values() if not c.error), default=total_est)
    if failed:  # not a memory verdict: say so instead of advising a smaller batch
        lines.append(f"\nverdict      unknown: the compiler failed on this program for a reason other than memory "
                     f"({failed[0][:200]}); the planner's estimate is {_fmt_gib(total_est)} per chip "
                     f"({100 * total_est / hbm:.0f}% of HBM)")
        print("\n".join(lines))
        return
    if refused:
        lines.append(f"\nverdict      {verdict}: the compiler refused it ({refused[0]})")
    else:
        lines.append(f"\nverdict      {verdict}: {_fmt_gib(peak)} of {_fmt_gib(hbm)} per chip "
                     f"({100 * peak / hbm:.0f}%; the bar is {100 * FIT_FRACTION:.0f}%"
                     + (", by the compiled program)" if case.compiled else
                        ", by the planner's estimate; --compile checks it)"))
    if not _fits(case, hbm):
        lines.append("             " + _advice(case, args, hbm))
    print("\n".join(lines))


def _step_seconds(case: Case, args, topo, cfg) -> float:
    """The estimated step time of a case with a full-depth cost: the roofline of the compiler's counts, plus
    splash attention at the chip's peak (XLA counts nothing for Pallas kernels)."""
    from jaxmodels import pods
    flops, moved, _ = case.cost
    kernel_s = 0.0
    step = next(iter(case.compiled.values()))
    if pods.pallas_calls(step.hlo):
        recompute = 4 / 3 if case.remat == "full" else 1.0
        kernel_s = _attention_flops(cfg, args.seq) * args.batch * args.seq * recompute / topo.chips / topo.peak_flops
    return pods.roofline(flops, moved, topo) + kernel_s


def _attention_flops(cfg, seq: int) -> float:
    """Training FLOPs of causal attention per token (forward + backward; the term of train.metrics'
    flops_per_token)."""
    if hasattr(cfg, "kv_lora_rank"):
        qk, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        qk = v = cfg.head_dim
    return 3 * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * (qk + v) * (seq / 2)


def _model_flops(cfg, args, tokens: int) -> float:
    """Training FLOPs of a step by the trainer's formula (6 per matmul parameter per token, 4 with LoRA, plus
    causal attention): what MFU counts as useful work."""
    from jaxmodels.model import abstract_model
    from jaxmodels.train.metrics import flops_per_token
    return flops_per_token(abstract_model(cfg, jnp.bfloat16), args.seq, lora=bool(args.lora_rank)) * tokens
