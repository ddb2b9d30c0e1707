"""Training DeepSeek-V3's multi-token-prediction layer (`--mtp-loss-weight`).

The step's objective must be  main LM loss + lambda x mean over depths of the MTP cross-entropy, each
averaged over the step's counted targets; with lambda = 0 the main loss and its gradient are unchanged;
gradient accumulation stays exact with the MTP term. The step runs with plain SGD at lr 1 so its update
is exactly minus the gradient.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxmodels
from jaxmodels.inputs import segment_positions
from jaxmodels.train import step as steplib
from jaxmodels.train.loss import mtp_loss_terms, shift_labels, token_cross_entropy
from test_convert import read_tensors, write_checkpoint
from test_mtp import mtp_tensors
from tiny import make_checkpoint

LAMBDA = 0.3


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-mtp")
    src, _ = make_checkpoint(root, "deepseek_v3", num_nextn_predict_layers=1)
    tensors = read_tensors(src)
    path = write_checkpoint(src, root / "with-mtp", {**tensors, **mtp_tensors(tensors)})
    return jaxmodels.from_pretrained(os.fspath(path), jnp.float32, progress=False)


def packed_batch(rows=4, seq=16, seed=0):
    """Rows of two or three documents each; labels unshifted with -100 at every document start."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, 96, (rows, seq)).astype(np.int32)
    seg = np.ones((rows, seq), np.int32)
    for r in range(rows):
        cuts = sorted(rng.choice(np.arange(3, seq - 3), 2, replace=False))
        seg[r, cuts[0]:] = 2
        seg[r, cuts[1]:] = 3
    seg[0, -2:] = 0  # padding
    labels = np.where(seg == 0, -100, ids)
    starts = np.concatenate([np.ones((rows, 1), bool), seg[:, 1:] != seg[:, :-1]], 1)
    labels[starts] = -100
    pos = np.asarray(segment_positions(jnp.asarray(seg)))
    return {"input_ids": ids, "labels": labels.astype(np.int32), "segment_ids": seg, "positions": pos}


def run_step(model, batch, k, weight):
    graphdef, params, frozen, buffers = steplib.split_model(model)
    tx = optax.sgd(1.0)
    state = steplib.init_state(params, buffers, tx)
    micro = {n: v.reshape(k, v.shape[0] // k, *v.shape[1:]) for n, v in batch.items()}
    step = jax.jit(functools.partial(steplib.train_step, graphdef, tx, steplib.StepOptions(mtp_loss_weight=weight)))
    new, metrics = step(state, frozen, micro)
    grads = jax.tree.map(lambda a, b: a - b, params, new["params"])
    return grads, metrics


def expected_objective(model, batch, weight):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def objective(p):
        m = nnx.merge(graphdef, p, rest)
        h = m.hidden(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"])
        total, count, _ = token_cross_entropy(m, h, shift_labels(jnp.asarray(batch["labels"])))
        terms = mtp_loss_terms(m, h, batch)
        return total / count + weight * sum(t / c for t, c, _ in terms) / len(terms)

    return jax.value_and_grad(objective)(params)


def flat(tree):
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(tree)}


def eh_proj(tree):
    (value,) = [v for k, v in flat(tree).items() if "mtp_layers" in k and "eh_proj" in k]
    return value


def assert_close(a, b, rtol=2e-5, atol=5e-7):  # atol: (params - new params) of O(1) weights
    a, b = flat(a), flat(b)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


def test_mtp_objective_gradient_and_metrics(model):
    batch = packed_batch()
    _, want = expected_objective(model, batch, LAMBDA)
    grads, metrics = run_step(model, batch, 1, LAMBDA)
    assert_close(grads, want)
    # The MTP layer itself learns, and the step reports its loss and top-1 accuracy (the acceptance rate).
    assert np.abs(eh_proj(grads)).max() > 0
    terms = mtp_loss_terms(model, model.hidden(batch["input_ids"], segment_ids=batch["segment_ids"]), batch)
    (t, c, r), = terms
    np.testing.assert_allclose(metrics["mtp_loss"], [t / c], rtol=1e-5)
    np.testing.assert_allclose(metrics["mtp_accuracy"], [r / c], rtol=1e-6)


def test_zero_weight_leaves_the_main_loss_alone(model):
    batch = packed_batch(seed=1)
    _, want = expected_objective(model, batch, 0.0)
    grads, metrics = run_step(model, batch, 1, 0.0)
    assert_close(grads, want)
    assert "mtp_loss" not in metrics
    assert np.abs(eh_proj(grads)).max() == 0


def test_gradient_accumulation_with_mtp_equals_the_large_batch(model):
    batch = packed_batch(seed=2)
    one, m1 = run_step(model, batch, 1, LAMBDA)
    two, m2 = run_step(model, batch, 2, LAMBDA)
    assert_close(two, one)
    np.testing.assert_allclose(m2["mtp_loss"], m1["mtp_loss"], rtol=1e-5)
