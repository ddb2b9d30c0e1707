"""What a run reports: metrics.jsonl, TensorBoard event files (when a writer is installed), FLOPs and MFU."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
from flax import nnx

from jaxmodels.config import BaseConfig, DeepseekConfig

# Dense bf16 matmul peak per chip (FLOP/s), by jax's device_kind. Unknown chips (CPUs) report no MFU.
PEAK_BF16_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA H100 PCIe": 756e12,
    "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA B200": 2250e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def peak_flops(device=None) -> float | None:
    """The device's dense bf16 peak FLOP/s, or None when unknown."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    if kind in PEAK_BF16_FLOPS:
        return PEAK_BF16_FLOPS[kind]
    for name, value in PEAK_BF16_FLOPS.items():
        if kind.startswith(name):
            return value
    return None


def matmul_params(model) -> float:
    """Parameters a token multiplies with: everything but the embedding gather and norms; routed experts
    count k / E of their weights (a token visits k of E experts)."""
    cfg: BaseConfig = model.config
    total = 0.0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = [str(p) for p in path]
        if "embed_tokens" in names and not cfg.tie_word_embeddings:
            continue  # a gather, not a matmul (the tied table is also the output head)
        if len(var.shape) - ("layers" in (var.get_metadata().get("axes") or ())) < 2:
            continue  # norms' scales and biases
        n = math.prod(var.shape)
        if "experts" in names and isinstance(cfg, DeepseekConfig) and "shared_experts" not in names:
            n *= cfg.num_experts_per_tok / cfg.n_routed_experts
        total += n
    return total


def flops_per_token(model, seq_len: int, *, lora: bool = False) -> float:
    """Training FLOPs per token: 6 per matmul parameter (forward 2, backward 4; 4 with LoRA, whose frozen
    weights get no gradient) plus causal attention over an average context of seq_len / 2."""
    cfg = model.config
    per_param = 4.0 if lora else 6.0
    if isinstance(cfg, DeepseekConfig):
        qk, v, heads = cfg.qk_head_dim, cfg.v_head_dim, cfg.num_attention_heads
    else:
        qk = v = cfg.head_dim
        heads = cfg.num_attention_heads
    attention = 3 * 2 * cfg.num_hidden_layers * heads * (qk + v) * (seq_len / 2)
    return per_param * matmul_params(model) + attention


class MetricsLog:
    """metrics.jsonl (one object per logged step; a resumed run keeps the lines up to its checkpoint and
    appends) plus TensorBoard scalars when tensorboardX or torch's writer is installed."""

    def __init__(self, out_dir: str, resume_step: int | None, *, enabled: bool = True):
        # enabled=False (every process but 0 of a multi-process run): the same calls, no files written.
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.enabled, self.tb = enabled, None
        if not enabled:
            return
        if resume_step is None:
            open(self.path, "w").close()
        elif os.path.exists(self.path):
            # Steps logged after the checkpoint we resume from will be run (and logged) again.
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(kept)
        self.tb = _tensorboard_writer(os.path.join(out_dir, "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: _jsonable(v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _tensorboard_writer(log_dir: str):
    for module in ("tensorboardX", "torch.utils.tensorboard"):
        try:
            writer = __import__(module, fromlist=["SummaryWriter"]).SummaryWriter
        except ImportError:
            continue
        return writer(log_dir)
    return None


def _jsonable(v):
    if isinstance(v, (np.ndarray, jax.Array)):
        v = np.asarray(v)
        return v.item() if v.ndim == 0 else np.round(v.astype(float), 6).tolist()
    if isinstance(v, (np.floating, float)):
        return None if not math.isfinite(float(v)) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v
