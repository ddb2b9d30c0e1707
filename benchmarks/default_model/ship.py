"""Writes a training run into the package as the embedded default model, and measures it.

    python benchmarks/default_model/ship.py --run runs/default_model [--data data/default_model]
                                            [--out jaxmodels/default_model]

1. `jaxmodels export RUN` (float32 master weights -> HF layout), 2. `jaxmodels convert --dtype bf16` into
--out (the weights ship in bf16), 3. the tokenizer files and a generation_config.json beside them,
4. heldout_sample.jsonl: the held-out files of 1-4 KB (a few KB the tests re-measure), 5. eval.json: held-out
loss and bits per byte of the shipped (bf16) weights on all held-out files and on the sample, with the
gzip -9 / xz -9e baselines (benchmarks/default_model/evaluate.py) and, with an MTP layer, the greedy
speculative-decoding acceptance rate from held-out prompts, 6. sizes. MODEL_CARD.md is written by hand
from eval.json and the run's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE_BYTES = (1024, 4096)  # held-out files this size go into the shipped sample


def export_trained(run_dir: str, out_dir: str) -> None:
    """`jaxmodels export RUN OUT` (train.export.export_run) for a from-scratch run, tolerating one known
    trainer bug: train/step.py's `_set_bias` applies the main MoE layers' balancing update ([moe layers,
    experts]) to every routing bias, so the MTP layer's bias ([1, experts]) is broadcast to [moe layers,
    experts] after the first step. The MTP forward reads row `depth` of it (LayerStack.layer), so
    that row is what was trained with; it is exported. step.py now updates only the main stack's bias, so
    new runs export with `jaxmodels export` directly; this keeps the shipped run (trained before the fix)
    reproducible."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxmodels.convert.hf import save_pretrained
    from jaxmodels.train.checkpoint import Checkpoints
    from jaxmodels.convert.export import copy_tokenizer_files
    from jaxmodels.train.loop import CONFIG_FILE, build_mesh, init_from_config
    from jaxmodels.train.step import split_model

    with open(os.path.join(run_dir, CONFIG_FILE)) as f:
        run_cfg = json.load(f)
    assert run_cfg["init_from_config"] and not run_cfg.get("lora_rank"), "a from-scratch full training run"
    ckpts = Checkpoints(run_dir, read_only=True)
    step = ckpts.all_steps()[-1]
    base = ckpts.read_meta(step)["model"]
    model = init_from_config(base, jnp.float32, build_mesh(None), mtp=bool(run_cfg.get("mtp_loss_weight")))
    _, params, _, buffers = split_model(model, nnx.Param)
    with open(os.path.join(run_dir, "checkpoints", str(step), "buffers", "_METADATA")) as f:
        stored = {k: v["value_metadata"]["write_shape"] for k, v in json.load(f)["tree_metadata"].items()}

    def names(path):
        return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)

    def as_stored(path, x):
        shape = tuple(stored[str(names(path))])
        return x if shape == x.shape else jnp.zeros(shape, x.dtype)

    target = jax.tree_util.tree_map_with_path(as_stored, buffers)
    restored = ckpts.restore(step, {"params": params, "buffers": target}, items=("params", "buffers"))
    fixed = jax.tree_util.tree_map_with_path(lambda p, x, ref: x[:ref.shape[0]] if x.shape != ref.shape else x,
                                             restored["buffers"], buffers)
    nnx.update(model, restored["params"], fixed)
    ckpts.close()
    save_pretrained(model, out_dir, progress=False)
    copy_tokenizer_files(base, out_dir)
    print(f"exported step {step} of {run_dir}")


def main(argv=None) -> int:
    sys.path.insert(0, HERE)
    import jax.numpy as jnp

    import jaxmodels
    from evaluate import heldout_metrics
    from jaxmodels.convert.hf import convert_checkpoint
    from jaxmodels.tokenizer import Tokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="the `jaxmodels train` run directory")
    p.add_argument("--data", default="data/default_model", help="prepare.py's output directory")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(HERE)), "jaxmodels", "default_model"))
    args = p.parse_args(argv)

    keep = {"MODEL_CARD.md"}
    os.makedirs(args.out, exist_ok=True)
    for name in os.listdir(args.out):
        if name not in keep:
            os.remove(os.path.join(args.out, name))
    with tempfile.TemporaryDirectory() as tmp:
        export_trained(args.run, os.path.join(tmp, "f32"))
        convert_checkpoint(os.path.join(tmp, "f32"), os.path.join(tmp, "bf16"), jnp.bfloat16, progress=False)
        for name in os.listdir(os.path.join(tmp, "bf16")):
            shutil.copy2(os.path.join(tmp, "bf16", name), args.out)
        # (convert_checkpoint carries the tokenizer files over from f32/)
    with open(os.path.join(args.out, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(args.out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
                   "pad_token_id": cfg["pad_token_id"], "do_sample": False, "max_new_tokens": 64}, f, indent=2)

    with open(os.path.join(args.data, "heldout.jsonl"), encoding="utf-8") as f:
        heldout = [json.loads(line) for line in f if line.strip()]
    sample = [r for r in heldout if SAMPLE_BYTES[0] <= len(r["text"].encode()) <= SAMPLE_BYTES[1]]
    with open(os.path.join(args.out, "heldout_sample.jsonl"), "w", encoding="utf-8") as f:
        for r in sample:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")

    model = jaxmodels.from_pretrained(args.out, jnp.float32, progress=False)
    tok = Tokenizer.from_checkpoint(args.out)
    with open(os.path.join(args.data, "baselines.json")) as f:
        base = json.load(f)
    full = heldout_metrics(model, tok, [r["text"] for r in heldout])
    assert full["bytes"] == base["baselines"]["bytes"], "the baselines were measured on other text"
    result = {
        "heldout": dict(full, files=len(heldout), gzip_9_bits_per_byte=base["baselines"]["gzip_9"]["bits_per_byte"],
                        xz_9e_bits_per_byte=base["baselines"]["xz_9e"]["bits_per_byte"]),
        "heldout_sample": dict(heldout_metrics(model, tok, [r["text"] for r in sample]), files=len(sample),
                               paths=[r["path"] for r in sample]),
        "weights": "bf16 on disk, evaluated in float32 (jaxmodels.from_pretrained(dir, jnp.float32))",
        "data": {k: base[k] for k in ("python", "held_out_rule", "train", "heldout", "vocab_size")},
    }
    from jaxmodels.layers.mtp import num_mtp_layers
    if num_mtp_layers(model):
        # Greedy self-speculative decoding from every held-out file's first 128 tokens (64 new tokens each):
        # the share of MTP drafts the main model accepts.
        import numpy as np
        accepted = drafted = steps = new = 0
        for r in heldout:
            ids = np.asarray([tok.encode(r["text"])[:128]])
            _, st = jaxmodels.generate(model, ids, max_new_tokens=64, eos_token_id=[], speculative=True,
                                       return_stats=True)
            accepted, drafted = accepted + int(st["accepted"]), drafted + int(st["drafted"])
            steps, new = steps + int(st["steps"]) + 1, new + int(st["new_tokens"])
        result["mtp_speculative"] = {"prompts": len(heldout), "prompt_tokens": 128, "new_tokens": new,
                                     "forward_passes": steps, "accepted": accepted, "drafted": drafted,
                                     "acceptance_rate": accepted / max(drafted, 1)}
    sizes = {n: os.path.getsize(os.path.join(args.out, n)) for n in sorted(os.listdir(args.out))}
    result["bytes_on_disk"] = dict(sizes, total=sum(sizes.values()))
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
