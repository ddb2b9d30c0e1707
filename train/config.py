"""`TrainConfig`: every option of `jaxmodels train`, validated before anything is loaded."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from jaxmodels.options import REMAT_NAMES
from jaxmodels.units import DTYPES

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZER_DTYPES = ("float32", "bf16")  # AdamW's moments (any spelling of these in DTYPES works too)


class TrainError(ValueError):
    """A training option or input the run cannot use (the message names the cause and the fix)."""


@dataclass(frozen=True)
class TrainConfig:
    """Options of a fine-tuning run (the CLI flags of `jaxmodels train`, same names with underscores).

    Batches: `batch_size` rows (of `seq_len` tokens) per micro-batch, `grad_accum` micro-batches per
    optimizer step; `steps` counts optimizer steps (1-based in metrics). `epochs` instead of `steps` runs
    that many passes over the packed data.
    """

    model: str
    data: str
    out: str
    eval_data: str | None = None
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    seq_len: int = 1024
    lr: float = 2e-5
    warmup: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0  # the schedule decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    clip: float | None = 1.0
    grad_accum: int = 1
    lora_rank: int | None = None
    lora_alpha: float | None = None  # default: 2 * rank
    lora_targets: tuple[str, ...] | None = None  # default: lora.default_targets
    mesh: str | None = None  # e.g. "fsdp=8,expert=2"; default: all devices on fsdp
    # Multi-slice / multi-node: mesh axis sizes across slices (TPU) or nodes (GPU), e.g. "data=2"; `mesh` then
    # describes one slice / node (see jaxmodels.distributed.make_mesh).
    dcn_mesh: str | None = None
    dtype: str = "bf16"  # compute dtype
    param_dtype: str | None = None  # master weights: float32 (full fine-tune) / bf16 (the frozen LoRA base)
    optimizer_dtype: str = "float32"  # AdamW's moments: float32, or bf16 (half the optimizer state's memory)
    remat: str = "save_matmuls"  # measured on an H100: faster and smaller than "none" (benchmarks/RESULTS.md)
    save_every: int = 500
    keep: int = 3
    log_every: int = 10
    eval_every: int = 500
    eval_batches: int | None = None  # default: the whole eval file
    seed: int = 0
    resume: bool = False
    # Train from scratch: initialise from the model directory's config.json (init_model) instead of loading
    # its weights; the directory still provides the tokenizer.
    init_from_config: bool = False
    # MoE: DeepSeek-V3's auxiliary-loss-free balancing (bias += rate * sign(mean load - load) after each
    # step; 0 turns it off), and the balance losses (None: the checkpoint's aux_loss_alpha / seq_aux).
    bias_update_rate: float = 1e-3
    aux_loss_alpha: float | None = None
    seq_aux: bool | None = None
    # DeepSeek-V3 multi-token prediction: adds mtp_loss_weight x the mean MTP cross-entropy (0: off).
    mtp_loss_weight: float = 0.0
    progress: bool = True

    def __post_init__(self):
        def positive(name, value, kind=int):
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0
                                      or (kind is int and int(value) != value)):
                raise TrainError(f"--{name.replace('_', '-')} must be a positive {kind.__name__}, got {value!r}")

        for name in ("steps", "batch_size", "seq_len", "grad_accum", "save_every", "keep", "log_every",
                     "eval_every", "eval_batches", "lora_rank"):
            positive(name, getattr(self, name))
        positive("lr", self.lr, float)
        positive("epochs", self.epochs, float)
        positive("lora_alpha", self.lora_alpha, float)
        if self.clip is not None:
            positive("clip", self.clip, float)
        if self.steps is None and self.epochs is None:
            raise TrainError("say how long to train: --steps N (optimizer steps) or --epochs E")
        if self.steps is not None and self.epochs is not None:
            raise TrainError("--steps and --epochs are exclusive; pass one")
        if self.warmup < 0:
            raise TrainError(f"--warmup must be >= 0, got {self.warmup}")
        if self.weight_decay < 0:
            raise TrainError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise TrainError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.bias_update_rate < 0:
            raise TrainError(f"--bias-update-rate must be >= 0, got {self.bias_update_rate}")
        if self.mtp_loss_weight < 0:
            raise TrainError(f"--mtp-loss-weight must be >= 0, got {self.mtp_loss_weight}")
        if self.aux_loss_alpha is not None and self.aux_loss_alpha < 0:
            raise TrainError(f"--aux-loss-alpha must be >= 0, got {self.aux_loss_alpha}")
        if self.schedule not in SCHEDULES:
            raise TrainError(f"--schedule {self.schedule!r} is not one of {SCHEDULES}")
        if self.remat not in REMAT_NAMES:
            raise TrainError(f"--remat {self.remat!r} is not a policy; use one of {sorted(REMAT_NAMES)}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) is not None and str(getattr(self, name)).lower() not in DTYPES:
                raise TrainError(f"--{name.replace('_', '-')} {getattr(self, name)!r} is not one of {sorted(DTYPES)}")
        if DTYPES.get(str(self.optimizer_dtype).lower()) not in (DTYPES[d] for d in OPTIMIZER_DTYPES):
            raise TrainError(f"--optimizer-dtype {self.optimizer_dtype!r} is not one of {OPTIMIZER_DTYPES} (float16 "
                             "moments would underflow the squared gradients)")
        if self.init_from_config and self.lora_rank is not None:
            raise TrainError("--init-from-config with --lora-rank would train adapters over random weights; drop one")
        if (self.lora_alpha is not None or self.lora_targets is not None) and self.lora_rank is None:
            raise TrainError("--lora-alpha / --lora-targets need --lora-rank R")
        for name in ("data", "eval_data"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise TrainError(f"--{name.replace('_', '-')} {path!r} does not exist (or is not a file); pass a "
                                 "JSONL file with one record per line")

    @property
    def lora(self) -> bool:
        return self.lora_rank is not None

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def check_out_dir(out: str) -> None:
    """--out must be creatable and writable: fail now, not at the first checkpoint."""
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{os.getpid()}")  # one per process: hosts may share --out
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise TrainError(f"--out {out!r} is not a writable directory ({e.strerror}); choose another path") from None
