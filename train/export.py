"""`jaxmodels export RUN_DIR OUT_HF_DIR [--step N] [--adapter-only]`: a training run back to Hugging Face.

The weights of checkpoint N (default: the latest) are put back into the run's base model. By default LoRA
adapters are merged into the base weights and the result is written as a plain transformers checkpoint
(config.json + safetensors + the base's tokenizer files). `--adapter-only` writes just the adapters as a
PEFT adapter (`adapter_config.json` + `adapter_model.safetensors`) for `peft.PeftModel.from_pretrained`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def read_run(run_dir: str, step: int | None = None):
    """(the run's train_config.json, its Checkpoints (read only), the step (latest by default), that step's
    meta), from the run directory's small files only: what an export can check before loading weights."""
    from jaxmodels.train.checkpoint import Checkpoints
    from jaxmodels.train.config import TrainError
    from jaxmodels.train.loop import CONFIG_FILE

    if not os.path.isfile(os.path.join(run_dir, CONFIG_FILE)):
        raise TrainError(f"{run_dir} is not a training run directory (no {CONFIG_FILE}); pass the --out of a "
                         "`jaxmodels train` run")
    with open(os.path.join(run_dir, CONFIG_FILE)) as f:
        run_cfg = json.load(f)
    ckpts = Checkpoints(run_dir, read_only=True)
    try:
        steps = ckpts.all_steps()
        if not steps:
            raise TrainError(f"{run_dir} has no complete checkpoint yet; train (or --resume) until one is saved")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise TrainError(f"{run_dir} has no checkpoint of step {step}; it has steps {steps}")
        meta = ckpts.read_meta(step)
    except BaseException:
        ckpts.close()
        raise
    return run_cfg, ckpts, step, meta


def load_run(run_dir: str, step: int | None = None):
    """(model with the trained weights of `step` (latest by default), the step, the base checkpoint path)."""
    from flax import nnx

    from jaxmodels.convert.hf import from_pretrained
    from jaxmodels.layers.linear import LoRAParam
    from jaxmodels.train.lora import add_lora
    from jaxmodels.train.step import split_model
    from jaxmodels.units import DTYPES

    run_cfg, ckpts, step, meta = read_run(run_dir, step)
    try:
        base = meta["model"]
        lora = meta.get("lora")
        param_dtype = DTYPES[(run_cfg.get("param_dtype") or ("bf16" if lora else "float32")).lower()]
        if run_cfg.get("init_from_config"):  # trained from scratch: the base directory holds no weights
            from jaxmodels.train.loop import build_mesh, init_from_config
            model = init_from_config(base, param_dtype, build_mesh(None), mtp=bool(run_cfg.get("mtp_loss_weight")))
        else:
            model = from_pretrained(base, param_dtype, progress=False)
        if lora:
            add_lora(model, rank=lora["rank"], alpha=lora["alpha"], targets=lora["targets"])
        _, params, _, buffers = split_model(model, LoRAParam if lora else nnx.Param)
        restored = ckpts.restore(step, {"params": params, "buffers": buffers}, items=("params", "buffers"))
        nnx.update(model, restored["params"], restored["buffers"])
    finally:
        ckpts.close()
    return model, step, base


MTP_NOTE = ("note: {out} keeps DeepSeek-V3's multi-token-prediction layer (model.layers.{first}.*, for "
            "jaxmodels' speculative decoding and MTP loss). transformers loads the checkpoint but reports those tensors "
            "as UNEXPECTED (it skips only layer 61's silently); `jaxmodels export --no-mtp` leaves them out.")


def export_run(run_dir: str, out_dir: str, *, step: int | None = None, adapter_only: bool = False,
               progress: bool = True, mtp: bool = True) -> str:
    """Writes checkpoint `step` of a run as an HF checkpoint (LoRA merged) or, with adapter_only, as a PEFT
    adapter. mtp=False leaves DeepSeek-V3's multi-token-prediction layers out of the HF checkpoint (transformers
    does not use them and lists their tensors as UNEXPECTED when it loads the checkpoint). Returns out_dir."""
    from jaxmodels.config import load_config
    from jaxmodels.convert.export import copy_tokenizer_files
    from jaxmodels.convert.files import check_writable_dir
    from jaxmodels.convert.hf import save_pretrained
    from jaxmodels.train.config import TrainError
    from jaxmodels.train.lora import has_lora, merge_lora, peft_unwritable, save_adapter

    # Everything that can be checked from the run's small files and the output path, before loading weights.
    _, ckpts, step, meta = read_run(run_dir, step)
    ckpts.close()
    lora = meta.get("lora")
    if adapter_only and not lora:
        raise TrainError(f"--adapter-only: the run in {run_dir} trained all weights, not LoRA adapters; export "
                         "without --adapter-only")
    if adapter_only and peft_unwritable(load_config(meta["model"]), lora["targets"]):
        raise TrainError(f"--adapter-only: the run adapted DeepSeek's dense / shared-expert MLP "
                         f"({','.join(peft_unwritable(load_config(meta['model']), lora['targets']))}), which a PEFT "
                         "adapter cannot hold (peft reads those names as the routed experts); export without "
                         "--adapter-only to write the merged model")
    check_writable_dir(out_dir, "the export's output directory")

    model, step, base = load_run(run_dir, step)
    if adapter_only:
        save_adapter(model, out_dir, base_model_name_or_path=base)
        return out_dir
    if has_lora(model):
        model = merge_lora(model)
    if not mtp:
        model.model.mtp_layers = None
    save_pretrained(model, out_dir, progress=progress)
    copy_tokenizer_files(base, out_dir)
    return out_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a `jaxmodels train` run directory (its --out)")
    p.add_argument("out", help="output directory for the Hugging Face checkpoint / PEFT adapter")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--adapter-only", action="store_true", help="write only the LoRA adapters, as a PEFT adapter")
    p.add_argument("--no-mtp", action="store_true",
                   help="leave DeepSeek-V3's multi-token-prediction layers out (transformers does not use them and "
                        "lists their tensors as UNEXPECTED when loading; jaxmodels' speculative decoding needs them)")


def run(args) -> int:
    from jaxmodels.config import ConfigError
    from jaxmodels.convert.hf import CheckpointError
    from jaxmodels.train.config import TrainError

    try:
        out = export_run(args.run, args.out, step=args.step, adapter_only=args.adapter_only, mtp=not args.no_mtp)
    except (TrainError, ConfigError, CheckpointError, OSError, ValueError) as e:  # OSError: the output path
        print(f"jaxmodels export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    if not args.adapter_only:  # where users meet transformers' UNEXPECTED report, say what it is
        from jaxmodels.config import load_config
        from jaxmodels.convert.reader import Checkpoint
        from jaxmodels.convert.validate import checkpoint_mtp_layers

        cfg = load_config(out)
        if checkpoint_mtp_layers(cfg, Checkpoint(out)):
            print(MTP_NOTE.format(out=out, first=cfg.num_hidden_layers), file=sys.stderr)
    return 0
