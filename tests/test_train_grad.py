"""Loss and gradients through the scanned decoder equal transformers' (float32, tiny random models).

`jaxmodels.train.lm_loss` must equal `model(input_ids, attention_mask=..., labels=labels).loss` and its
gradient must equal the torch gradient of that loss, parameter by parameter (our stacked parameters are cut
into transformers' per-layer / per-expert tensors with the converter's own export key map).

transformers' attention backends disagree with each other on fully masked query rows (left-padding
positions): sdpa and eager return different hidden states there. Such a row only matters when a counted
target is predicted from it (the first real token of a left-padded row), which no training batch has;
the left-padded cases here therefore ignore that one target and run transformers' eager attention, whose
masked rows our attention reproduces exactly. Right-padded and unpadded cases use transformers' default.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import jaxmodels
from jaxmodels.convert.keymap import export_keys
from jaxmodels.train import lm_loss
from tiny import make_checkpoint, random_batch

LOSS_TOL = 1e-5
GRAD_TOL = 1e-4

VARIANTS = {
    "v2-greedy": ("deepseek_v2", {}),
    "v2-group_limited": ("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=4, topk_group=2)),
    "v2-no_q_lora-biases": ("deepseek_v2", dict(q_lora_rank=None, attention_bias=True, mlp_bias=True)),
    # transformers' eager attention repeats K/V num_heads // num_key_value_heads times: give it all heads.
    "v3": ("deepseek_v3", dict(num_key_value_heads=4)),
    "v3-yarn-no_interleave": ("deepseek_v3", dict(num_key_value_heads=4, rope_interleave=False, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16, mscale=1.0,
        mscale_all_dim=0.8, beta_fast=32.0, beta_slow=1.0))),
    "stablelm": ("stablelm", {}),
    "stablelm-qknorm-parallel-tied": ("stablelm", dict(qk_layernorm=True, use_parallel_residual=True,
                                                      use_qkv_bias=True, tie_word_embeddings=True)),
}


def hf_named(cfg, grads) -> dict[str, np.ndarray]:
    """Our gradient tree in transformers' names and layouts (per-expert tensors also fused as transformers 5
    stores them: experts.gate_up_proj [E, 2*inter, hidden], experts.down_proj [E, hidden, inter])."""
    out = {}
    for path, var in nnx.to_flat_state(grads):
        value = np.asarray(var.get_value())
        for key, index, transform in export_keys(cfg, tuple(str(p) for p in path), value.shape):
            x = value[index] if index else value
            out[key] = transform(x) if transform else x
    fused = {}
    for key in list(out):
        parts = key.split(".")
        if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
            i = parts.index("experts")
            prefix, e, proj = ".".join(parts[:i + 1]), int(parts[i + 1]), parts[i + 2]
            fused.setdefault((prefix, proj), {})[e] = out[key]
    for (prefix, proj), per_expert in fused.items():
        out[f"{prefix}.{proj}"] = np.stack([per_expert[e] for e in sorted(per_expert)])
    for prefix in {p for p, _ in fused}:
        out[f"{prefix}.gate_up_proj"] = np.concatenate([out[f"{prefix}.gate_proj"], out[f"{prefix}.up_proj"]], 1)
    return out


# Right padding for every variant; left padding (the eager-attention case) for one per family.
CASES = [(name, "right") for name in VARIANTS] + [(name, "left") for name in ("v2-greedy", "v3", "stablelm")]


@pytest.mark.parametrize("name,padding", CASES)
def test_loss_and_gradients_match_transformers(tmp_path, name, padding):
    family, overrides = VARIANTS[name]
    path, hf = make_checkpoint(tmp_path, family, **overrides)
    model = jaxmodels.from_pretrained(path, progress=False)
    cfg = model.config
    pad = dict(pad_left=3) if padding == "left" else dict(pad_right=3)
    ids, mask = random_batch(cfg.vocab_size, batch=2, seq=10, seed=1, **pad)
    labels = ids.copy()
    labels[mask == 0] = -100
    labels[1, 4] = -100  # an ignored target inside a row
    if padding == "left":
        labels[0, 3] = -100  # predicted from a fully masked padding row (see the module docstring)
        hf.set_attn_implementation("eager")

    ref = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), labels=torch.as_tensor(labels))
    ref.loss.backward()
    ref_grads = {n: p.grad.numpy() for n, p in hf.named_parameters() if p.grad is not None}

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss, grads = jax.jit(jax.value_and_grad(
        lambda p: lm_loss(nnx.merge(graphdef, p, rest), ids, labels, mask)))(params)
    assert abs(float(loss) - float(ref.loss)) <= LOSS_TOL * abs(float(ref.loss))

    ours = hf_named(cfg, grads)
    assert set(ref_grads) <= set(ours), f"transformers has gradients we lack: {set(ref_grads) - set(ours)}"
    errors = {k: np.abs(ours[k] - r).max() / max(np.abs(r).max(), 1e-12) for k, r in ref_grads.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] < GRAD_TOL, f"{worst}: relative gradient error {errors[worst]:.2e}"


@pytest.mark.parametrize("family", ["stablelm", "deepseek_v3"])
def test_cast_once_equals_cast_where_used(tmp_path, family):
    """The train step casts float32 master weights to bf16 once, before the layer scan
    (`step.compute_params`); the layers would otherwise cast each weight where they use it. Same loss, same
    gradients (the gradient of a cast is a cast back), float32 gradients for every parameter. The one
    difference seen: the routed experts' weight gradients (XLA's ragged_dot on CPU) differ within bf16
    rounding (< 5e-3 relative), as XLA rounds that product's gradient differently when the cast sits inside
    the layer scan's body (a standalone ragged_dot shows no difference)."""
    import jax.numpy as jnp

    from jaxmodels.train import step as steplib
    from jaxmodels.train.loss import shift_labels, token_cross_entropy

    path, _ = make_checkpoint(tmp_path, family)
    model = jaxmodels.from_pretrained(path, jnp.float32, progress=False)
    model = model.with_options(compute_dtype=jnp.bfloat16)
    graphdef, params, frozen, buffers = steplib.split_model(model)
    cast = nnx.to_flat_state(steplib.compute_params(params, jnp.bfloat16))
    kept = {".".join(map(str, p)) for p, v in cast if v.get_value().dtype == jnp.float32}
    assert kept and all("embed_tokens" in k or "norm" in k or ".gate." in k for k in kept), kept
    assert any(v.get_value().dtype == jnp.bfloat16 for _, v in cast)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, model.config.vocab_size, (2, 16)), jnp.int32)

    def loss(p, once):
        m = nnx.merge(graphdef, steplib.compute_params(p, jnp.bfloat16) if once else p, frozen, buffers)
        total, count, _ = token_cross_entropy(m, m.hidden(ids), shift_labels(ids))
        return total / count

    (l0, g0), (l1, g1) = (jax.value_and_grad(loss)(params, once) for once in (False, True))
    assert float(l0) == float(l1)
    for (p, a), (_, b) in zip(nnx.to_flat_state(g0), nnx.to_flat_state(g1)):
        a, b = np.asarray(a.get_value()), np.asarray(b.get_value())
        assert b.dtype == np.float32
        tol = 5e-3 if ".experts." in ".".join(map(str, p)) else 0.0
        assert np.abs(a - b).max() <= tol * np.abs(a).max(), p


def test_norms_and_gated_mlp_keep_only_their_inputs_for_backward():
    """The residuals a norm or a gated MLP hands to the backward pass (the leaves of its VJP closure) are its
    inputs (and the norm weight), never float32 [tokens, hidden] intermediates or the activation's output."""
    import jax.numpy as jnp

    from jaxmodels.layers.linear import gated
    from jaxmodels.layers.norms import layer_norm, rms_norm

    x = jnp.ones((4, 8, 64), jnp.bfloat16)
    w = jnp.ones((64,), jnp.float32)
    for f in (lambda x: layer_norm(x, w, w, 1e-5), lambda x: rms_norm(x, w, 1e-6)):
        _, vjp = jax.vjp(f, x)
        assert [(r.dtype, r.shape) for r in jax.tree.leaves(vjp)] == [(jnp.bfloat16, x.shape), (jnp.float32, w.shape)]
    g = jnp.ones((16, 32), jnp.bfloat16)
    _, vjp = jax.vjp(lambda a, b: gated(a, b, "silu"), g, g)
    assert [(r.dtype, r.shape) for r in jax.tree.leaves(vjp)] == [(jnp.bfloat16, g.shape)] * 2  # gate and up


def test_moe_float32_combine_and_router_keep_bf16_inputs_for_backward():
    """The MoE's float32 slot combine and router logits hand their bf16 inputs to the backward pass (and
    recompute the float32 casts), not float32 [tokens, top_k, hidden] / [tokens, hidden] copies; values and
    gradients are those of the plain float32 einsums."""
    import jax.numpy as jnp
    import numpy as np

    from jaxmodels.layers.moe import _router_logits, combine_slots

    ks = jax.random.split(jax.random.key(0), 3)
    y = jax.random.normal(ks[0], (6, 2, 32), jnp.bfloat16)
    wts = jax.random.uniform(ks[1], (6, 2), jnp.float32)
    _, vjp = jax.vjp(combine_slots, y, wts)
    assert sorted((str(r.dtype), r.shape) for r in jax.tree.leaves(vjp)) == [("bfloat16", y.shape), ("float32", wts.shape)]
    x = jax.random.normal(ks[2], (6, 32), jnp.bfloat16)
    router = jnp.ones((8, 32), jnp.bfloat16)
    _, vjp = jax.vjp(_router_logits, x, router)
    assert all(r.dtype == jnp.bfloat16 for r in jax.tree.leaves(vjp))

    def plain_combine(y, w):
        return jnp.einsum("tkd,tk->td", y.astype(jnp.float32), w)

    def plain_logits(x, r):
        return jnp.einsum("td,ed->te", x.astype(jnp.float32), r.astype(jnp.float32))

    for ours, plain, args in ((combine_slots, plain_combine, (y, wts)), (_router_logits, plain_logits, (x, router))):
        out, grads = jax.value_and_grad(lambda *a, f=ours: jnp.sum(f(*a) ** 2), argnums=(0, 1))(*args)
        ref, ref_grads = jax.value_and_grad(lambda *a, f=plain: jnp.sum(f(*a) ** 2), argnums=(0, 1))(*args)
        np.testing.assert_array_equal(out, ref)
        for a, b in zip(grads, ref_grads):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
