"""The optimizer (optax AdamW, warmup + decay, global-norm clipping) and DeepSeek-V3's routing-bias update."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxmodels.train.config import TrainConfig
from jaxmodels.units import DTYPES


def schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to lr over `warmup` steps, then cosine / linear decay to lr * min_lr_ratio at
    `total_steps`, or constant."""
    warmup = min(cfg.warmup, max(total_steps - 1, 0))
    end = cfg.lr * cfg.min_lr_ratio
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        after = optax.constant_schedule(cfg.lr)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def decay_mask(params) -> object:
    """True for the weights AdamW decays: not norms' scales, not biases. (The routing bias is no Param at all,
    so it never reaches the optimizer.)"""

    def decays(path, _):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        names = [n for n in names if n != "value"]  # nnx Variables are pytree nodes holding `.value`
        return not (names[-1] == "bias" or any("norm" in n for n in names))

    return jax.tree_util.tree_map_with_path(decays, params)


def optimizer(cfg: TrainConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW behind global-norm clipping, with the schedule; returns (tx, schedule). The moments are stored
    in `cfg.optimizer_dtype` (float32, or bf16: half the optimizer state's memory); either way each step
    computes them in float32 (the gradient is float32) and rounds once, when it stores them."""
    sched = schedule(cfg, total_steps)
    dtype = DTYPES[cfg.optimizer_dtype.lower()]
    parts = [optax.clip_by_global_norm(cfg.clip)] if cfg.clip else []
    parts.append(moments_in(optax.adamw(sched, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay,
                                        mask=decay_mask, mu_dtype=dtype), dtype))
    return optax.chain(*parts), sched


def moments_in(tx: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """`tx` with Adam's second moment `nu` created in `dtype` too (optax's `mu_dtype` covers only the first).

    optax's Adam update casts the new `nu` back to the dtype of the state it was given (`cast_like`), so a
    `nu` created in bf16 stays bf16, while the update itself runs in the gradient's float32. (Rounding to
    nearest: with b2 = 0.999 a bf16 `nu` moves only when a squared gradient is a few times its value, so it
    decays slower than in float32 and Adam's steps come out slightly smaller, never larger.)"""
    if jnp.dtype(dtype) == jnp.float32:
        return tx

    def is_adam(s):
        return isinstance(s, optax.ScaleByAdamState)

    def init(params):
        state = tx.init(params)
        return jax.tree.map(lambda s: s._replace(nu=optax.tree.cast(s.nu, dtype)) if is_adam(s) else s, state,
                            is_leaf=is_adam)

    return optax.GradientTransformationExtraArgs(init, tx.update)


def update_routing_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """Auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2): bias [layers, experts] += rate * sign(mean load -
    load), per layer, from this step's token-slot counts load [layers, experts]. No gradient is involved."""
    load = load.astype(jnp.float32)
    return bias + rate * jnp.sign(load.mean(-1, keepdims=True) - load)
