"""`jaxmodels train`: fine-tune a checkpoint on a JSONL file.

  jaxmodels train --model PATH_OR_HUB_ID --data train.jsonl [--eval-data eval.jsonl] --out runs/x
                  [--steps N | --epochs E] [--batch-size B] [--seq-len L] [--lr 2e-5] [--warmup 100]
                  [--schedule cosine|linear|constant] [--weight-decay 0.1] [--clip 1.0] [--grad-accum K]
                  [--lora-rank R --lora-alpha A --lora-targets q_b_proj,kv_b_proj,o_proj,...]
                  [--mesh fsdp=8,expert=2] [--dtype bf16] [--optimizer-dtype bf16] [--remat POLICY] [--save-every N] [--keep K]
                  [--log-every N] [--seed S] [--resume] [--mtp-loss-weight 0.1] [--init-from-config]
                  [--coordinator HOST:PORT --num-processes N --process-id I | --distributed] [--dcn-mesh data=2]

Records: {"text"} | {"prompt", "completion"} | {"messages"} (chat template; loss on assistant turns) for
language models; {"text", "label"} / {"text", "labels"} for the classification heads. See README
"Fine-tuning", and "Training on several hosts" for the multi-process flags (run the same command on every
host; jaxmodels.distributed).

  jaxmodels train --out runs/x --resume [--steps N]   # continue: the other options come from runs/x/train_config.json

Every option left out takes TrainConfig's default (shown by --help); with --resume, the value the run was
started with (train_config.json).
"""

from __future__ import annotations

import argparse
import sys

from jaxmodels.units import DTYPES


def add_arguments(p: argparse.ArgumentParser) -> None:
    from jaxmodels.options import REMAT_NAMES
    from jaxmodels.train.config import OPTIMIZER_DTYPES, SCHEDULES

    p.add_argument("--model", help="checkpoint directory (or hub id, when online); required unless --resume")
    p.add_argument("--data", help="training JSONL file; required unless --resume")
    p.add_argument("--eval-data", help="evaluation JSONL file (loss every --eval-every steps)")
    p.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl, train_config.json")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="total optimizer steps (with --resume: may extend the run)")
    length.add_argument("--epochs", type=float, help="passes over the packed training data")
    p.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch, over all devices")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per row (documents are packed)")
    p.add_argument("--lr", type=float, default=2e-5, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    p.add_argument("--schedule", choices=SCHEDULES, default="cosine", help="decay after warmup")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay (never on norms and biases)")
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lora-rank", type=int, help="train LoRA adapters of this rank instead of all weights")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (scale alpha / rank; default 2 x rank)")
    p.add_argument("--lora-targets", help="comma-separated module names, e.g. q_b_proj,kv_b_proj,o_proj "
                                          "(default: every attention projection, on StableLM every MLP projection "
                                          "too; 'experts' adds DeepSeek's routed experts)")
    p.add_argument("--mesh", help="mesh axes, e.g. fsdp=8,expert=2 (default: every device on fsdp)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="compute dtype")
    p.add_argument("--param-dtype", choices=sorted(DTYPES), default=None,
                   help="master-weight dtype (default float32; LoRA's frozen base bf16)")
    p.add_argument("--optimizer-dtype", choices=OPTIMIZER_DTYPES, default="float32",
                   help="AdamW's moments: float32, or bf16 (half the optimizer state's memory; computed in float32)")
    p.add_argument("--remat", choices=sorted(REMAT_NAMES), default="save_matmuls",
                   help="what the backward pass recomputes inside each layer (memory for speed)")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    p.add_argument("--log-every", type=int, default=10, help="metrics.jsonl line every N steps")
    p.add_argument("--eval-every", type=int, default=500, help="evaluate every N steps (and at the end)")
    p.add_argument("--eval-batches", type=int, help="evaluate on at most this many batches")
    p.add_argument("--seed", type=int, default=0, help="data order and LoRA initialisation")
    p.add_argument("--init-from-config", action="store_true", default=None,
                   help="train from scratch: initialise the model --model's config.json describes (its tokenizer is "
                        "used; weights there are ignored)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint; "
                   "options not given are read from the run's train_config.json")
    p.add_argument("--bias-update-rate", type=float, default=1e-3,
                   help="DeepSeek-V3 aux-loss-free balancing rate (0: off)")
    p.add_argument("--aux-loss-alpha", type=float, default=None,
                   help="expert-balance loss weight (default: the checkpoint's aux_loss_alpha, else 0)")
    p.add_argument("--mtp-loss-weight", type=float, default=0.0,
                   help="DeepSeek-V3 multi-token prediction: add this x the mean MTP cross-entropy (0: off)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    pod = p.add_argument_group("several hosts (one process per host, the same command on each)")
    pod.add_argument("--coordinator", help="HOST:PORT of process 0, the same on every process (default: "
                                           "$JAX_COORDINATOR_ADDRESS)")
    pod.add_argument("--num-processes", help="processes in the run (default: $JAX_NUM_PROCESSES)")
    pod.add_argument("--process-id", help="this process, 0..N-1 (default: $JAX_PROCESS_ID)")
    pod.add_argument("--distributed", action="store_true",
                     help="multi-process run on a cluster jax detects (Cloud TPU pod, SLURM, Open MPI, GKE): "
                          "coordinator and process ids from the environment")
    pod.add_argument("--dcn-mesh", help="mesh axes across TPU slices / GPU nodes, e.g. data=2 (--mesh is then one "
                                        "slice's or node's)")
    _defaults_in_help(p)


def _defaults_in_help(p: argparse.ArgumentParser) -> None:
    """Every option's default, from TrainConfig (the one place defaults live), shown in its --help line. The
    parser itself defaults to None, so that config_from_args can tell an option left out (TrainConfig's default,
    or with --resume the run's own value) from one given."""
    import dataclasses

    from jaxmodels.train.config import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for action in p._actions:
        value = defaults.get(action.dest)
        if action.dest in ("resume", "progress") or value is None or value is False or value is dataclasses.MISSING:
            continue
        action.default = None
        action.help = f"{action.help} (default: {value})"


def config_from_args(args) -> "TrainConfig":  # noqa: F821
    """The TrainConfig of the flags given; the rest from TrainConfig's defaults, or with --resume from the
    run's train_config.json (so `--out X --resume` needs nothing else; --steps may extend the run)."""
    import dataclasses

    from jaxmodels.train.config import TrainConfig, TrainError

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None and k not in ("resume",)}
    if args.clip is not None:
        given["clip"] = args.clip or None  # 0: off
    if args.lora_targets:
        given["lora_targets"] = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    if args.resume:
        saved = saved_config(args.out)
        if "steps" in given or "epochs" in given:
            saved.pop("steps", None), saved.pop("epochs", None)
        given = {**{k: v for k, v in saved.items() if k in fields and k not in ("out", "resume", "progress")},
                 **given}
        if given.get("lora_targets") is not None:
            given["lora_targets"] = tuple(given["lora_targets"])
    for name in ("model", "data"):
        if given.get(name) is None:
            raise TrainError(f"--{name} is required (with --resume it is read from the run's train_config.json)")
    return TrainConfig(**given, resume=args.resume, progress=not args.quiet)


def saved_config(out: str) -> dict:
    """The options a run in `out` was started with (its train_config.json; {} when there is none: then
    --model and --data must be given, and the trainer says whether there is a checkpoint to resume)."""
    import json
    import os

    from jaxmodels.train.config import TrainError
    from jaxmodels.train.loop import CONFIG_FILE

    path = os.path.join(out, CONFIG_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise TrainError(f"--resume: {path} cannot be read ({e}); pass the options again, or start a new --out") \
            from None


def run(args) -> int:
    from jaxmodels import distributed
    from jaxmodels.config import ConfigError
    from jaxmodels.convert.hf import CheckpointError
    from jaxmodels.sharding import ShardingError
    from jaxmodels.tokenizer import TokenizerError
    from jaxmodels.train.config import TrainError
    from jaxmodels.train.loop import train

    try:
        config = config_from_args(args)
        # Before anything touches a device: jax.distributed must know every process first.
        distributed.initialize(distributed.parse_options(args.coordinator, args.num_processes, args.process_id,
                                                         args.distributed))
        trainer = train(config)
    except (TrainError, ConfigError, CheckpointError, ShardingError, TokenizerError, FileNotFoundError,
            distributed.DistributedError) as e:
        print(f"jaxmodels train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        step, saved = getattr(e, "step", None), getattr(e, "saved", None)
        if step is None:
            where = "before training started"
        else:
            where = f"at step {step}"
        if saved is not None:
            kept = f"; the last complete checkpoint (step {saved}) is kept: continue with --out {args.out} --resume"
        elif step is not None or not args.resume:
            kept = "; no checkpoint had been saved yet, so there is nothing to resume"
        else:
            kept = f"; the run's checkpoints in {args.out} are untouched"
        print(f"jaxmodels train: interrupted {where}{kept}", file=sys.stderr)
        return 130
    if trainer.primary:
        print(f"trained {trainer.step_count} steps; checkpoints in {trainer.checkpoints.directory}, metrics in "
              f"{trainer.metrics_log.path}")
    return 0
