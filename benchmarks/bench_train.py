"""Training-step speed and memory on one GPU: jaxmodels vs transformers + torch fused AdamW.

Real-size configurations with random weights (nothing is downloaded), bf16 compute:
  stablelm-3b   full fine-tune, float32 master weights and AdamW state; 4x1024 without remat, 8x1024 with
                remat (ours: --remat full / save_matmuls; transformers: gradient checkpointing); LoRA rank 16
  v2-lite-6l    DeepSeek-V2-Lite width (hidden 2048, 64 experts top-6, MLA) with 6 layers, 8x1024; LoRA 16

Each row runs in its own subprocess (GPU memory is returned between them): N timed optimizer steps after
two warm-up steps (the first compiles), tokens/s from the median step, MFU = tokens/s x training FLOPs per
token (jaxmodels.train.metrics.flops_per_token: 6 per matmul parameter, 4 with LoRA, plus causal
attention) / the GPU's dense bf16 peak, and peak device memory (jax memory_stats / torch
max_memory_allocated). transformers runs with sdpa attention, torch.autocast(bf16) over float32 weights,
torch.optim.AdamW(fused=True); its LoRA rows use peft over a bf16 base.

  python benchmarks/bench_train.py --compare-hf --out /tmp/bench        # the whole table
  python benchmarks/bench_train.py --rows stablelm-3b/4x1024 --steps 5  # one row, ours only
  python benchmarks/bench_train.py --rows stablelm-3b/8x1024-remat --remat lean --optimizer-dtype bf16 \
      --xla-options in_place --compare-hf        # the memory-lean 8x1024 candidate (benchmarks/RESULTS.md)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import common  # noqa: E402
from bench_generate import MODELS  # noqa: E402  (the real-size configurations)
from common import fmt, median  # noqa: E402

CONFIGS = {
    "stablelm-3b": MODELS["stablelm-3b"],
    "v2-lite-6l": dict(MODELS["deepseek-v2-lite"], num_hidden_layers=6),
}
# row name -> (model, batch, seq, remat (ours), hf gradient checkpointing, lora rank)
ROWS = {
    "stablelm-3b/4x1024": ("stablelm-3b", 4, 1024, "none", False, None),
    "stablelm-3b/8x1024-remat": ("stablelm-3b", 8, 1024, "save_matmuls", True, None),
    "stablelm-3b/8x1024-remat-full": ("stablelm-3b", 8, 1024, "full", True, None),
    "stablelm-3b/4x1024-lora16": ("stablelm-3b", 4, 1024, "none", False, 16),
    "v2-lite-6l/8x1024": ("v2-lite-6l", 8, 1024, "none", False, None),
    "v2-lite-6l/8x1024-lora16": ("v2-lite-6l", 8, 1024, "none", False, 16),
}
if os.environ.get("BENCH_SMOKE"):  # a CPU smoke run of the script itself: tiny shapes, same code paths
    for _c in CONFIGS.values():
        _c.update(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4)
        if "kv_lora_rank" in _c:
            _c.update(moe_intermediate_size=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
                      v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2)
    ROWS = {k: (m, 2, 32, r, g, lo) for k, (m, b, s, r, g, lo) in ROWS.items()}

LORA_TARGETS = {"stablelm-3b": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                "v2-lite-6l": ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
                               "down_proj")}


def worker_ours(row: str, steps: int, attention: str = "auto", remat_override: str | None = None,
                probe: str | None = None, profile: str | None = None, optimizer_dtype: str = "float32",
                xla_options: str = "default") -> dict:
    """probe (diagnostics): "sgd" swaps AdamW for plain SGD (isolates the optimizer's cost), "bf16-master"
    keeps bf16 weights (isolates the float32 master weights' casts). profile: a folder; two more steps run
    under the jax profiler and the device-time breakdown (benchmarks/profile_summary.py) is printed and
    written there as profile_<row>.md."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxmodels.config import config_from_hf
    from jaxmodels.model import init_model
    from jaxmodels import sharding
    from jaxmodels.sharding import make_mesh
    from jaxmodels.train import step as steplib
    from jaxmodels.train.config import TrainConfig
    from jaxmodels.train.metrics import flops_per_token, peak_flops
    from jaxmodels.train.optim import optimizer

    name, b, s, remat, _, lora = ROWS[row]
    remat = remat_override or remat
    cfg = config_from_hf(dict(CONFIGS[name], architectures=None))
    mesh = make_mesh()
    t0 = time.perf_counter()
    model = init_model(cfg, mesh, jnp.bfloat16 if lora or probe == "bf16-master" else jnp.float32, std=0.02)
    model = model.with_options(compute_dtype=jnp.bfloat16, remat=remat, attention=attention)
    trainable = None
    if lora:
        from jaxmodels.layers.linear import LoRAParam
        from jaxmodels.train.lora import add_lora
        add_lora(model, rank=lora, alpha=2 * lora, targets=LORA_TARGETS[name])
        trainable = LoRAParam
    graphdef, params, frozen, buffers = steplib.split_model(model, *([trainable] if trainable else []))
    # TrainConfig validates a data file path; this script's own file stands in (no data is read).
    tcfg = TrainConfig(model=name, data=os.path.abspath(__file__), out="/tmp", steps=1000, lr=1e-5, warmup=10,
                       batch_size=b, seq_len=s, lora_rank=lora, remat=remat, optimizer_dtype=optimizer_dtype)
    tx, _ = optimizer(tcfg, 1000)
    if probe == "sgd":
        import optax
        tx = optax.sgd(1e-5)
    state = steplib.init_state(params, buffers, tx)
    step_fn, _ = steplib.compile_steps(graphdef, tx, steplib.StepOptions(), state, frozen,
                                       steplib.XLA_OPTION_SETS[xla_options])
    rng = np.random.default_rng(0)
    ids = rng.integers(10, cfg.vocab_size, (1, b, s)).astype(np.int32)
    batch = sharding.shard_batch({"input_ids": ids, "labels": ids, "segment_ids": np.ones_like(ids),
                               "positions": np.broadcast_to(np.arange(s, dtype=np.int32), ids.shape)}, mesh, micro=True)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    times, losses = [], []
    for i in range(steps + 2):
        t = time.perf_counter()
        state, metrics = step_fn(state, frozen, batch)
        losses.append(float(metrics["loss"]))  # host sync: the step is finished
        times.append(time.perf_counter() - t)
        if i == 0:
            print(f"[ours {row}] first step (compile) {times[0]:.1f}s, loss {losses[0]:.3f}", flush=True)
    dt = median(times[2:])
    if profile:
        from profile_summary import profile as run_profile
        holder = {"state": state}

        def one_step():
            holder["state"], m = step_fn(holder["state"], frozen, batch)
            return m["loss"]

        name = f"profile_{row.replace('/', '_')}{'_' + probe if probe else ''}.md"
        run_profile(one_step, 2, f"{row} (remat {remat}, attention {attention}, probe {probe}): step "
                    f"{dt * 1e3:.1f} ms", os.path.join(profile, name))
        state = holder["state"]
    tok_s = b * s / dt
    fpt = flops_per_token(model, s, lora=bool(lora))
    peak = peak_flops()
    stats = jax.devices()[0].memory_stats() or {}
    mem = step_fn.lower(state, frozen, batch).compile().memory_analysis()
    print(f"[ours {row}] compiled temp {getattr(mem, 'temp_size_in_bytes', 0) / 1e9:.1f} GB, arguments "
          f"{getattr(mem, 'argument_size_in_bytes', 0) / 1e9:.1f} GB", flush=True)
    return {"tok_s": tok_s, "step_ms": dt * 1e3, "mfu": tok_s * fpt / peak if peak else None,
            "peak_gb": stats.get("peak_bytes_in_use", 0) / 1e9, "init_s": init_s, "losses": losses[:4],
            "device": jax.devices()[0].device_kind, "flops_per_token": fpt}


def worker_hf(row: str, steps: int) -> dict:
    import torch
    import transformers

    name, b, s, _, checkpointing, lora = ROWS[row]
    raw = dict(CONFIGS[name])
    hf_cfg = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(
            hf_cfg, dtype=torch.bfloat16 if lora else torch.float32, attn_implementation="sdpa")
    if checkpointing:
        model.gradient_checkpointing_enable()
    if lora:
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=lora, lora_alpha=2 * lora,
                                                           target_modules=list(LORA_TARGETS[name])))
        for p in model.parameters():  # adapters in float32 (peft keeps the base dtype otherwise)
            if p.requires_grad:
                p.data = p.data.float()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1, fused=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, hf_cfg.vocab_size, (b, s), generator=g).cuda()
    times, losses = [], []
    torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 2):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    dt = median(times[2:])
    return {"tok_s": b * s / dt, "step_ms": dt * 1e3, "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
            "losses": losses[:4], "device": torch.cuda.get_device_name()}


def run_worker(kind: str, row: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--rows", row, "--steps", str(args.steps),
           "--attention", args.attention, "--optimizer-dtype", args.optimizer_dtype, "--xla-options",
           args.xla_options] + (["--remat", args.remat] if args.remat else []) + (
               ["--probe", args.probe] if args.probe else []) + (["--profile", args.profile] if args.profile else [])
    t = time.perf_counter()
    result = common.run_worker(cmd, f"{kind} {row}", timeout=args.timeout, out=args.out, echo=True,
                               env={"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"})
    if "error" not in result:
        print(f"-- {kind} {row} done in {time.perf_counter() - t:.0f}s", flush=True)
    return result


def table(results: dict) -> str:
    lines = ["| row | jaxmodels tok/s | MFU | peak GB | transformers tok/s | peak GB | ratio |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row, r in results.items():
        ours, hf = r.get("ours", {}), r.get("hf", {})
        ratio = ours["tok_s"] / hf["tok_s"] if "tok_s" in ours and "tok_s" in hf else None
        lines.append(f"| {row} | {fmt(ours.get('tok_s'), '.0f') if 'error' not in ours else ours['error']} | "
                     f"{fmt(ours.get('mfu') and 100 * ours['mfu'], '.1f')}% | {fmt(ours.get('peak_gb'), '.1f')} | "
                     f"{fmt(hf.get('tok_s'), '.0f') if 'error' not in hf else hf['error']} | "
                     f"{fmt(hf.get('peak_gb'), '.1f')} | {fmt(ratio, '.2f')}x |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows of {list(ROWS)}")
    p.add_argument("--steps", type=int, default=6, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--compare-hf", action="store_true", help="also run transformers on each row")
    p.add_argument("--out", help="directory for results.json and failure logs")
    p.add_argument("--timeout", type=int, default=900, help="seconds per worker")
    p.add_argument("--attention", default="auto", help="jaxmodels attention implementation (Options.attention)")
    p.add_argument("--remat", default=None, help="override the rows' jaxmodels remat policy")
    p.add_argument("--optimizer-dtype", default="float32", choices=["float32", "bf16"],
                   help="jaxmodels AdamW moments (`jaxmodels train --optimizer-dtype`)")
    p.add_argument("--xla-options", default="default", choices=["default", "in_place"],
                   help="XLA options of jaxmodels' step (jaxmodels.train.step.XLA_OPTION_SETS)")
    p.add_argument("--probe", choices=["sgd", "bf16-master"], help="diagnostics (see worker_ours)")
    p.add_argument("--profile", help="folder: profile two extra steps of ours, write the device-time breakdown there")
    p.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    args = p.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    if args.worker:
        result = (worker_ours(rows[0], args.steps, args.attention, args.remat, args.probe, args.profile,
                              args.optimizer_dtype, args.xla_options)
                  if args.worker == "ours" else worker_hf(rows[0], args.steps))
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    results = {}
    for row in rows:
        results[row] = {"ours": run_worker("ours", row, args)}
        if args.compare_hf:
            results[row]["hf"] = run_worker("hf", row, args)
        print(json.dumps({row: results[row]}), flush=True)
    print(table(results))
    common.save_results(args.out, results, table(results))


if __name__ == "__main__":
    main()
