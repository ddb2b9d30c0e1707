"""DeepSeek-V3 FP8 weights: float8_e4m3fn values with one float32 scale per 128x128 block."""

from __future__ import annotations

import numpy as np

BLOCK = 128


def dequantize_fp8(weight: np.ndarray, scale_inv: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """weight [out, in] (float8_e4m3fn), scale_inv [ceil(out/block), ceil(in/block)] -> float32 [out, in].

    Each block of `weight` is multiplied by its scale (the checkpoint's `weight_scale_inv` holds the
    dequantisation multiplier, as DeepSeek's reference `weight_dequant` uses it). Edge blocks may be partial.
    """
    out_dim, in_dim = weight.shape
    rows, cols = -(-out_dim // block), -(-in_dim // block)
    if scale_inv.shape != (rows, cols):
        raise ValueError(f"weight_scale_inv shape {scale_inv.shape} does not match weight {weight.shape} "
                         f"with {block}x{block} blocks (expected {(rows, cols)})")
    scales = np.repeat(np.repeat(scale_inv.astype(np.float32), block, axis=0), block, axis=1)
    return weight.astype(np.float32) * scales[:out_dim, :in_dim]
