"""Checkpoint loading speed: jaxmodels.from_pretrained vs transformers' from_pretrained, same files.

A random bf16 checkpoint in the hub's layout (per-layer, per-expert keys, [out, in] weights, 5 GB shards
with model.safetensors.index.json) is written once for each real-size configuration (nothing is
downloaded; the tensors are written directly with safetensors, no torch model is built):
  stablelm-3b   StableLM-3B-4E1T shapes, 2.8B parameters
  v2-lite-6l    DeepSeek-V2-Lite width (hidden 2048, 64 routed experts, MLA) with 6 layers

Then each load runs in its own fresh subprocess, alternating jaxmodels / transformers, each twice:
  jaxmodels     jaxmodels.from_pretrained(dir, dtype=bfloat16), then jax.block_until_ready on every array
                (default device)
  transformers  AutoModelForCausalLM.from_pretrained(dir, dtype=torch.bfloat16, device_map="cuda") then
                torch.cuda.synchronize() (device_map="cpu" without a GPU)
Seconds are wall time of that call inside the worker (imports and backend start-up excluded; config
parsing, file reads and transfers included), GB/s = checkpoint bytes / seconds. The files were just written,
so the page cache is warm for every run: this measures the loaders, not the disk.

  python benchmarks/bench_load.py --out /tmp/bench_load                   # both models
  python benchmarks/bench_load.py --models stablelm-3b --repeats 3
  BENCH_SMOKE=1 python benchmarks/bench_load.py                            # tiny shapes, CPU, < 1 min
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import common  # noqa: E402
from bench_generate import MODELS  # noqa: E402  (the real-size configurations)
from common import fmt  # noqa: E402

CONFIGS = {
    "stablelm-3b": MODELS["stablelm-3b"],
    "v2-lite-6l": dict(MODELS["deepseek-v2-lite"], num_hidden_layers=6),
}
SHARD_BYTES = 5 << 30  # the hub's usual max_shard_size
if os.environ.get("BENCH_SMOKE"):  # a CPU smoke run of the script itself (bench_generate shrank MODELS)
    CONFIGS["v2-lite-6l"].update(num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2)
    SHARD_BYTES = 1 << 20  # several shards, so the index path runs too


def hub_tensors(raw: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every tensor of the configuration's hub checkpoint, from the converter's own
    export key map (what save_pretrained writes), without allocating anything."""
    import numpy as np
    from flax import nnx

    from jaxmodels.config import config_from_hf
    from jaxmodels.convert.keymap import export_keys
    from jaxmodels.model import abstract_model

    cfg = config_from_hf(raw)
    _, state = nnx.split(abstract_model(cfg, np.float32))
    out = []
    for p, var in nnx.to_flat_state(state):
        path = tuple(str(x) for x in p)
        for key, index, transform in export_keys(cfg, path, var.shape):
            shape = var.shape[len(index):]
            if transform is not None:
                shape = transform(np.broadcast_to(np.False_, shape)).shape
            out.append((key, tuple(shape)))
    return out


def write_checkpoint(name: str, out_dir: str) -> int:
    """Writes config.json (transformers' own save_pretrained) and random bf16 safetensors shards in the
    hub's layout. Returns the tensor bytes written."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file
    from transformers import AutoConfig

    raw = dict(CONFIGS[name])
    hf_cfg = AutoConfig.for_model(**raw)
    hf_cfg.dtype = "bfloat16"
    hf_cfg.architectures = [{"stablelm": "StableLmForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM"}[
        raw["model_type"]]]
    hf_cfg.save_pretrained(out_dir)
    # One random pool (std 0.02, like an initialised model), cut at varying offsets: fast to write, and
    # finite values in every tensor (loading must not depend on the values anyway).
    pool = (np.random.default_rng(0).standard_normal(1 << 24, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    tensors = hub_tensors(raw)
    shards, current, size = [], [], 0
    for key, shape in tensors:
        nbytes = math.prod(shape) * 2
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((key, shape))
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        data = {}
        for j, (key, shape) in enumerate(shard):
            n = math.prod(shape)
            start = (j * 7919) % len(pool)
            flat = np.resize(np.roll(pool, -start), n) if n > len(pool) else np.roll(pool, -start)[:n]
            data[key] = flat.reshape(shape)
            weight_map[key] = fname
            total += n * 2
        save_file(data, os.path.join(out_dir, fname), metadata={"format": "pt"})
        del data
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return total


def worker_ours(path: str) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jaxmodels

    jnp.zeros(1).block_until_ready()  # backend start-up is not loading (the transformers worker's torch.zeros(1))
    t = time.perf_counter()
    model = jaxmodels.from_pretrained(path, dtype=jnp.bfloat16, progress=False)
    jax.block_until_ready(nnx.state(model))
    seconds = time.perf_counter() - t
    leaves = jax.tree.leaves(nnx.state(model))
    return {"seconds": seconds, "bytes": sum(x.nbytes for x in leaves), "device": str(leaves[0].devices().pop())}


def worker_hf(path: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.init()
        torch.zeros(1, device="cuda")  # context creation is not loading
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "device": str(next(model.parameters()).device)}


def run_worker(kind: str, path: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--path", path]
    return common.run_worker(cmd, f"{kind} {os.path.basename(path)}", timeout=args.timeout, out=args.out)


def table(results: dict) -> str:
    lines = ["| model | run | GB | jaxmodels s | GB/s | transformers s | GB/s | speed-up |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        for i, (ours, hf) in enumerate(zip(r["ours"], r["hf"])):
            gb = r["bytes"] / 1e9
            so, sh = ours.get("seconds"), hf.get("seconds")
            lines.append(f"| {name} | {i + 1} | {gb:.2f} | {fmt(so, '.2f') if so else ours.get('error')} | "
                         f"{fmt(so and gb / so, '.2f')} | {fmt(sh, '.2f') if sh else hf.get('error')} | "
                         f"{fmt(sh and gb / sh, '.2f')} | {fmt(so and sh and sh / so, '.2f')}x |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    p.add_argument("--repeats", type=int, default=2, help="loads of each kind per model (alternating)")
    p.add_argument("--out", help="directory for results.json and failure logs")
    p.add_argument("--dir", help="where to write the checkpoints (default: a temporary directory, removed)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per worker")
    p.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        result = worker_ours(args.path) if args.worker == "ours" else worker_hf(args.path)
        print("RESULT " + json.dumps(result), flush=True)
        return
    names = [m for m in args.models.split(",") if m]
    for m in names:
        if m not in CONFIGS:
            p.error(f"unknown model {m!r}; choose from {list(CONFIGS)}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    base = args.dir or tempfile.mkdtemp(prefix="bench_load-")
    results = {}
    try:
        for name in names:
            path = os.path.join(base, name)
            os.makedirs(path, exist_ok=True)
            t = time.perf_counter()
            nbytes = write_checkpoint(name, path)
            print(f"-- {name}: wrote {nbytes / 1e9:.2f} GB in {time.perf_counter() - t:.0f}s", flush=True)
            r = results[name] = {"bytes": nbytes, "ours": [], "hf": []}
            for i in range(args.repeats):
                for kind in (("ours", "hf") if i % 2 == 0 else ("hf", "ours")):
                    res = run_worker(kind, path, args)
                    r[kind].append(res)
                    print(f"-- {name} {kind} run {i + 1}: {json.dumps(res)}", flush=True)
            if not args.dir:
                shutil.rmtree(path, ignore_errors=True)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    print(table(results))
    common.save_results(args.out, results, table(results))


if __name__ == "__main__":
    main()
