"""The optimizer (optax AdamW, warmup + decay, global-norm clipping) and DeepSeek-V3's routing-bias update."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxmodels.train.config import TrainConfig


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


def optimizer(cfg: TrainConfig, total_steps: int, moment_dtype=jnp.float32
              ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW behind global-norm clipping, with the schedule; returns (tx, schedule). moment_dtype: AdamW's first
    moment (float32; the second follows the parameters' dtype, so bf16 parameters + bf16 here is bf16 state)."""
    sched = schedule(cfg, total_steps)
    parts = [optax.clip_by_global_norm(cfg.clip)] if cfg.clip else []
    parts.append(optax.adamw(sched, b1=0.9, b2=0.999, eps=1e-8,
                             weight_decay=cfg.weight_decay, mask=decay_mask, mu_dtype=moment_dtype))
    return optax.chain(*parts), sched


def update_routing_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """Auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2): bias [layers, experts] += rate * sign(mean load -
    load), per layer, from this step's token-slot counts load [layers, experts]. No gradient is involved."""
    load = load.astype(jnp.float32)
    return bias + rate * jnp.sign(load.mean(-1, keepdims=True) - load)
