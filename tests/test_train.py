"""The fine-tuning trainer's invariants: packing, gradient accumulation, remat, bf16 compute, the optimizer,
DeepSeek's routing bias and balance loss, resume (also after SIGKILL), sharded == single device, clear CLI
errors, export, classification heads and metrics.

Tiny random models (tests/tiny.py), seq_len 16, a few steps. Where equality is asserted the step runs in
float32 with plain SGD(lr=1) (tests/train_worker.py `one_step`), so "the parameters after a step are equal"
means "the gradients are equal" (Adam's first step is ~lr * sign(g), blind to the gradient's size).
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import jaxmodels
from jaxmodels import cli
from jaxmodels.inputs import segment_positions
from jaxmodels.train import TrainConfig, Trainer
from jaxmodels.train.config import TrainError
from jaxmodels.train import step as steplib
from jaxmodels.train.data import TrainData
from jaxmodels.train.loss import balance_loss, shift_labels, token_cross_entropy
from jaxmodels.train.optim import decay_mask, optimizer, schedule
from tiny import WORDS, add_word_tokenizer, make_checkpoint
from train_worker import flat, one_step

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SEQ = 16


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def texts(n, seed, lo=3, hi=20):
    rng = np.random.default_rng(seed)
    return [{"text": " ".join(rng.choice(WORDS[:40], rng.integers(lo, hi)))} for _ in range(n)]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Checkpoints (with the word tokenizer) and data files shared by the module."""
    root = tmp_path_factory.mktemp("train")
    ckpt, hf = {}, {}
    for family in ("deepseek_v3", "stablelm", "deepseek_v2"):
        path, model = make_checkpoint(root, family)
        ckpt[family], hf[family] = add_word_tokenizer(path), model
    return dict(root=root, ckpt=ckpt, hf=hf, data=write_jsonl(root / "train.jsonl", texts(60, 0)),
                eval=write_jsonl(root / "eval.jsonl", texts(12, 1)))


def rows(ws, family, n, start=0):
    data = TrainData.from_jsonl(ws["data"], ws["ckpt"][family], seq_len=SEQ, progress=False)
    return {k: v[start:start + n] for k, v in data.rows.items()}


def micro(batch, k):
    """[rows, seq] -> [k micro-batches, rows / k, seq]."""
    return {n: v.reshape(k, v.shape[0] // k, *v.shape[1:]) for n, v in batch.items()}


def assert_trees_close(a: dict, b: dict, rtol=1e-5, atol=1e-6):
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


def config(ws, out, family="stablelm", **kw) -> TrainConfig:
    base = dict(model=ws["ckpt"][family], data=ws["data"], out=str(out), steps=4, batch_size=4, seq_len=SEQ,
                lr=1e-2, warmup=1, log_every=1, save_every=100, dtype="float32", progress=False)
    return TrainConfig(**{**base, **kw})


def metrics_lines(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def final_params(out, family_ckpt):
    """The latest checkpoint's parameters (read back through the export loader)."""
    from jaxmodels.train.export import load_run
    model, step, _ = load_run(str(out))
    return step, flat(nnx.state(model, nnx.Param))


# ---------------------------------------------------------------------------------------------------
# 1. Packed rows
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["deepseek_v3", "stablelm"])
def test_packed_row_equals_documents_alone(ws, family):
    model = jaxmodels.from_pretrained(ws["ckpt"][family], jnp.float32, progress=False)
    rng = np.random.default_rng(3)
    docs = [rng.integers(4, 96, n) for n in (5, 7, 3)]
    ids = np.zeros((1, SEQ), np.int32)
    seg = np.zeros((1, SEQ), np.int32)  # one padding token at the end
    t = 0
    for i, d in enumerate(docs, start=1):
        ids[0, t:t + len(d)], seg[0, t:t + len(d)] = d, i
        t += len(d)
    pos = np.asarray(segment_positions(jnp.asarray(seg)))
    np.testing.assert_array_equal(pos[0], [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 0])

    packed = np.asarray(model.hidden(ids, segment_ids=seg, positions=pos))
    packed_default = np.asarray(model.hidden(ids, segment_ids=seg))  # positions derived from the segments
    np.testing.assert_allclose(packed_default, packed, rtol=1e-6, atol=1e-6)
    t = 0
    for d in docs:
        alone = np.asarray(model.hidden(d[None]))
        np.testing.assert_allclose(packed[:, t:t + len(d)], alone, rtol=1e-4, atol=1e-5)
        # Per-document losses: the packed slice and the document alone score the same targets.
        targets = shift_labels(jnp.asarray(d[None]))
        l_packed, n1, _ = token_cross_entropy(model, jnp.asarray(packed[:, t:t + len(d)]), targets)
        l_alone, n2, _ = token_cross_entropy(model, jnp.asarray(alone), targets)
        assert int(n1) == int(n2) == len(d) - 1
        np.testing.assert_allclose(float(l_packed), float(l_alone), rtol=1e-5)
        t += len(d)
    # Without segments the second document would see the first: the mask matters.
    unmasked = np.asarray(model.hidden(ids, positions=pos))
    assert np.abs(unmasked[:, 5:12] - packed[:, 5:12]).max() > 1e-3


# ---------------------------------------------------------------------------------------------------
# 2-4. Gradient accumulation, remat, bf16 compute
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["deepseek_v3", "stablelm"])
def test_grad_accum_equals_one_big_batch(ws, family):
    batch = rows(ws, family, 4)
    opts = steplib.StepOptions(bias_update_rate=1e-2 if family == "deepseek_v3" else 0.0)
    _, a, ma = one_step(ws["ckpt"][family], micro(batch, 2), opts=opts)  # grad_accum=2, batch 2
    before, b, mb = one_step(ws["ckpt"][family], micro(batch, 1), opts=opts)  # grad_accum=1, batch 4
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)
    assert int(ma["tokens"]) == int(mb["tokens"]) == int((shift_labels(batch["labels"]) != -100).sum())
    assert_trees_close(flat(a["params"]), flat(b["params"]))
    assert_trees_close(flat(a["buffers"]), flat(b["buffers"]), atol=0)
    # The step did move the parameters (so the comparison compares gradients, not two no-ops).
    moved = max(np.abs(x - flat(before["params"])[k]).max() for k, x in flat(b["params"]).items())
    assert moved > 1e-3
    if family == "deepseek_v3":
        np.testing.assert_array_equal(ma["expert_load"], mb["expert_load"])


def test_remat_policies_give_the_same_loss_and_gradients(ws):
    batch = micro(rows(ws, "stablelm", 2), 1)
    results = {r: one_step(ws["ckpt"]["stablelm"], batch, remat=r)[1:] for r in ("none", "full", "save_matmuls", "lean")}
    ref_state, ref_m = results["none"]
    for r, (state, m) in results.items():
        np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-6, err_msg=r)
        assert_trees_close(flat(state["params"]), flat(ref_state["params"]))


def test_bf16_compute_over_float32_master_weights(ws):
    path = ws["ckpt"]["stablelm"]
    batch = micro(rows(ws, "stablelm", 4), 1)
    tx, _ = optimizer(config(ws, ws["root"] / "unused", warmup=0, lr=1e-4), 10)
    _, s32, m32 = one_step(path, batch, tx=tx)
    before, s16, m16 = one_step(path, batch, tx=tx, compute_dtype=jnp.bfloat16)
    for tree in (s16["params"], s16["opt_state"]):
        for x in jax.tree.leaves(tree):
            if jnp.issubdtype(x.dtype, jnp.floating):
                assert x.dtype == jnp.float32
    np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=2e-2)
    assert float(m16["loss"]) != float(m32["loss"])  # bf16 did run
    # The float32 master weights received the update (a bf16 round trip would lose a 1e-4 step).
    b, a = flat(before["params"]), flat(s16["params"])
    assert all(np.abs(a[k] - b[k]).max() > 0 for k in a)


# ---------------------------------------------------------------------------------------------------
# 5. Optimizer
# ---------------------------------------------------------------------------------------------------

def test_decay_mask_and_weight_decay(ws):
    model = jaxmodels.from_pretrained(ws["ckpt"]["stablelm"], jnp.float32, progress=False)
    params = nnx.state(model, nnx.Param)
    mask = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(decay_mask(params))}
    no_decay = {k for k, m in mask.items() if not m}
    assert no_decay and all(("norm" in k or k.endswith("bias")) for k in no_decay)
    assert all(not mask[k] for k in mask if "norm" in k or k.endswith(".bias"))
    assert mask["lm_head.weight"] and mask["model.embed_tokens.weight"]
    assert any("layers" in k and "q_proj.weight" in k and m for k, m in mask.items())

    # Zero gradients: Adam's step is 0, what remains is decoupled decay -lr * wd * w on decayed weights only.
    cfg = config(ws, ws["root"] / "unused", schedule="constant", warmup=0, lr=0.1, weight_decay=0.5, clip=None)
    tx, _ = optimizer(cfg, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    for k, u in flat(updates).items():
        w = flat(params)[k]
        np.testing.assert_allclose(u, -0.05 * w if mask[k] else 0 * w, rtol=1e-6, atol=1e-8, err_msg=k)


def test_bf16_optimizer_moments(ws, tmp_path):
    """--optimizer-dtype bf16: both Adam moments are stored in bf16, a few steps' losses stay close to float32
    moments' (and are not the same run), and a run saved and resumed with them equals the uninterrupted one."""
    kw = dict(schedule="constant", warmup=0, save_every=2, lr=1e-3)
    ref = Trainer(config(ws, tmp_path / "f32", steps=4, **kw))
    ref.run()
    full = Trainer(config(ws, tmp_path / "bf16", steps=4, optimizer_dtype="bf16", **kw))
    adam = [s for s in jax.tree.leaves(full.state["opt_state"], is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
    assert len(adam) == 1
    for moment in (adam[0].mu, adam[0].nu):
        dtypes = {x.dtype for x in jax.tree.leaves(moment)}
        assert dtypes == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(full.state["params"])} == {jnp.dtype(jnp.float32)}
    full.run()
    adam = [s for s in jax.tree.leaves(full.state["opt_state"], is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
    assert {x.dtype for x in jax.tree.leaves((adam[0].mu, adam[0].nu))} == {jnp.dtype(jnp.bfloat16)}  # kept
    f32, bf16 = metrics_lines(tmp_path / "f32"), metrics_lines(tmp_path / "bf16")
    assert f32[0]["loss"] == bf16[0]["loss"]  # the same first forward pass
    np.testing.assert_allclose([m["loss"] for m in bf16], [m["loss"] for m in f32], rtol=1e-2)
    assert [m["loss"] for m in bf16] != [m["loss"] for m in f32]  # the moments were rounded

    Trainer(config(ws, tmp_path / "half", steps=2, optimizer_dtype="bf16", **kw)).run()
    resumed = Trainer(config(ws, tmp_path / "half", steps=4, optimizer_dtype="bf16", resume=True, **kw))
    assert resumed.step_count == 2
    resumed.run()
    np.testing.assert_allclose([m["loss"] for m in metrics_lines(tmp_path / "half")], [m["loss"] for m in bf16],
                               rtol=1e-6)
    assert_trees_close(final_params(tmp_path / "half", None)[1], final_params(tmp_path / "bf16", None)[1],
                       rtol=1e-6, atol=1e-7)
    with pytest.raises(TrainError, match="--optimizer-dtype"):  # resuming with other moments is refused
        Trainer(config(ws, tmp_path / "half", steps=6, resume=True, **kw))
    with pytest.raises(TrainError, match="--optimizer-dtype 'fp16'"):
        config(ws, tmp_path / "x", optimizer_dtype="fp16")


def test_schedules(ws):
    def values(**kw):
        cfg = config(ws, ws["root"] / "unused", lr=1.0, **kw)
        s = schedule(cfg, 10)
        return [float(s(i)) for i in range(11)]

    cos = values(schedule="cosine", warmup=2, min_lr_ratio=0.1)
    np.testing.assert_allclose(cos[:3], [0.0, 0.5, 1.0], atol=1e-6)  # linear warmup to lr at step `warmup`
    np.testing.assert_allclose(cos[6], 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 4 / 8)), atol=1e-6)
    np.testing.assert_allclose(cos[10], 0.1, atol=1e-6)  # lr * min_lr_ratio at the last step
    lin = values(schedule="linear", warmup=2)
    np.testing.assert_allclose([lin[2], lin[6], lin[10]], [1.0, 0.5, 0.0], atol=1e-6)
    const = values(schedule="constant", warmup=0)
    np.testing.assert_allclose(const, [1.0] * 11)
    assert all(np.diff(cos[2:]) <= 1e-7) and all(np.diff(lin[2:]) <= 1e-7)


def test_clipping_and_reported_grad_norm(ws):
    cfg = config(ws, ws["root"] / "unused", schedule="constant", warmup=0, lr=0.1, weight_decay=0.0, clip=1.0)
    tx, _ = optimizer(cfg, 10)
    params = {"w": jnp.ones((4,)), "b": jnp.ones((3,))}
    ref = optax.adamw(0.1, weight_decay=0.0)
    s, r = tx.init(params), ref.init(params)
    for scale in (100.0, 0.5):  # clipped (norm 100 -> 1), then not clipped (norm 0.5)
        g = {"w": jnp.arange(4.0), "b": -jnp.arange(3.0)}
        g = jax.tree.map(lambda x: x * scale / optax.global_norm(g), g)
        u, s = tx.update(g, s, params)
        clipped = jax.tree.map(lambda x: x * min(1.0, 1.0 / float(optax.global_norm(g))), g)
        ur, r = ref.update(clipped, r, params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), u, ur)
    # Without clipping the second update would differ (Adam's moments remember the norm-100 gradient).
    s2, u2 = ref.init(params), None
    for scale in (100.0, 0.5):
        g = {"w": jnp.arange(4.0), "b": -jnp.arange(3.0)}
        g = jax.tree.map(lambda x: x * scale / optax.global_norm(g), g)
        u2, s2 = ref.update(g, s2, params)
    assert abs(float(u2["w"][3]) - float(u["w"][3])) > 1e-3

    # In the step: grad_norm is the norm before clipping.
    path = ws["ckpt"]["stablelm"]
    batch = micro(rows(ws, "stablelm", 2), 1)
    before, sgd_after, m_sgd = one_step(path, batch)
    grads = {k: flat(before["params"])[k] - v for k, v in flat(sgd_after["params"]).items()}
    norm = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads.values()))
    tiny_clip = optax.chain(optax.clip_by_global_norm(1e-3), optax.sgd(1.0))
    before, clipped_after, m = one_step(path, batch, tx=tiny_clip)
    np.testing.assert_allclose(m["grad_norm"], norm, rtol=1e-4)
    np.testing.assert_allclose(m_sgd["grad_norm"], norm, rtol=1e-4)
    upd = np.sqrt(sum(((flat(before["params"])[k] - v).astype(np.float64) ** 2).sum()
                      for k, v in flat(clipped_after["params"]).items()))
    np.testing.assert_allclose(upd, 1e-3, rtol=1e-3)  # the update's norm is the clip


# ---------------------------------------------------------------------------------------------------
# 6. DeepSeek routing bias and balance loss
# ---------------------------------------------------------------------------------------------------

def _bias(tree) -> np.ndarray:
    (value,) = [v for k, v in flat(tree).items() if steplib.BIAS_NAME in k]
    return value


def test_routing_bias_update(ws):
    path = ws["ckpt"]["deepseek_v3"]
    batch = micro(rows(ws, "deepseek_v3", 4), 2)
    rate = 0.01
    # AdamW with weight decay: the bias must change by the rule alone (no decay, no Adam update).
    tx, _ = optimizer(config(ws, ws["root"] / "unused", family="deepseek_v3", weight_decay=0.5, warmup=0), 10)
    before, after, m = one_step(path, batch, tx=tx, opts=steplib.StepOptions(bias_update_rate=rate))
    load = np.asarray(m["expert_load"])  # [moe layers, experts], summed over the two micro-batches
    valid = int((batch["segment_ids"] != 0).sum())
    cfg = jaxmodels.from_pretrained(path, progress=False).config
    np.testing.assert_array_equal(load.sum(-1), valid * cfg.num_experts_per_tok)  # every token picks k experts
    want = _bias(before["buffers"]) + rate * np.sign(load.mean(-1, keepdims=True) - load)
    np.testing.assert_allclose(_bias(after["buffers"]), want, rtol=0, atol=1e-7)
    assert np.abs(_bias(after["buffers"]) - _bias(before["buffers"])).max() == pytest.approx(rate)
    # The bias is no parameter: not in the optimizer's state, not in the trained (decayed) tree.
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(after["opt_state"])[0]]
    assert names and not any(steplib.BIAS_NAME in n for n in names)
    assert not any(steplib.BIAS_NAME in k for k in flat(after["params"]))
    # Rate 0: unchanged.
    _, off, _ = one_step(path, batch, opts=steplib.StepOptions(bias_update_rate=0.0))
    np.testing.assert_array_equal(_bias(off["buffers"]), _bias(before["buffers"]))


def _numpy_balance_loss(hf, ids, alpha) -> float:
    """DeepSeek-V2's sequence-wise balance loss from transformers' router inputs, in numpy:
    per layer and sequence, alpha * sum_i (E / (K T) * count_i) * mean_t p_{t,i}; mean over sequences."""
    inputs = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda mod, args, out: inputs.append((mod, args[0].detach())))
             for layer in hf.model.layers if hasattr(layer.mlp, "gate")]
    with torch.no_grad():
        hf(input_ids=torch.as_tensor(ids))
    for h in hooks:
        h.remove()
    cfg = hf.config
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    total = 0.0
    for mod, x in inputs:
        x = x.numpy().astype(np.float64).reshape(ids.shape[0], ids.shape[1], -1)
        logits = x @ mod.weight.detach().numpy().astype(np.float64).T  # [b, t, E]
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        top = np.argsort(-p, -1)[..., :k]  # greedy top-k
        per_seq = []
        for b in range(ids.shape[0]):
            count = np.bincount(top[b].ravel(), minlength=e)
            f = count * e / (k * ids.shape[1])
            per_seq.append((f * p[b].mean(0)).sum())
        total += np.mean(per_seq)
    return alpha * total


def test_v2_aux_loss_is_alpha_times_balance_loss(ws):
    path, hf = ws["ckpt"]["deepseek_v2"], ws["hf"]["deepseek_v2"]
    rng = np.random.default_rng(7)
    ids = rng.integers(4, 96, (2, SEQ)).astype(np.int32)  # one document per row, no padding
    batch = {"input_ids": ids, "labels": ids, "segment_ids": np.ones_like(ids),
             "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), ids.shape).copy()}
    alpha = 0.3
    _, off, m0 = one_step(path, micro(batch, 1))
    _, on, m1 = one_step(path, micro(batch, 1), opts=steplib.StepOptions(aux_loss_alpha=alpha, seq_aux=True))
    np.testing.assert_allclose(m1["aux_loss"], _numpy_balance_loss(hf, ids, alpha), rtol=1e-4)
    assert float(m0["aux_loss"]) == 0.0
    np.testing.assert_allclose(m1["loss"], m0["loss"], rtol=1e-6)  # the reported loss is the cross-entropy
    # The objective's gradient includes alpha * d(balance): the router weights move differently.
    gates = [k for k in flat(on["params"]) if "gate.weight" in k]
    assert gates and max(np.abs(flat(on["params"])[k] - flat(off["params"])[k]).max() for k in gates) > 1e-6


def test_balance_loss_batch_form():
    load = np.array([[[2.0, 0.0, 1.0, 1.0], [0.0, 2.0, 1.0, 1.0]]])  # [1 layer, 2 rows, 4 experts], k=2
    score = np.array([[[0.8, 0.2, 0.6, 0.4], [0.1, 0.9, 0.5, 0.5]]])
    valid = np.ones((2, 2), bool)
    got = balance_loss({"load": jnp.asarray(load), "score": jnp.asarray(score)}, jnp.asarray(valid), 2,
                       per_sequence=False)
    f = load.sum(1)[0] * 4 / (2 * 4)
    p = score.sum(1)[0] / 4
    np.testing.assert_allclose(float(got), (f * p).sum(), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# 7. Resume == uninterrupted
# ---------------------------------------------------------------------------------------------------

def test_resume_equals_uninterrupted(ws, tmp_path):
    kw = dict(schedule="constant", warmup=0, save_every=3)
    Trainer(config(ws, tmp_path / "a", steps=6, **kw)).run()
    Trainer(config(ws, tmp_path / "b", steps=3, **kw)).run()
    first = metrics_lines(tmp_path / "b")
    assert [m["step"] for m in first] == [1, 2, 3]
    resumed = Trainer(config(ws, tmp_path / "b", steps=6, resume=True, **kw))  # a longer --steps extends the run
    assert resumed.step_count == 3 and resumed.position == 3
    resumed.run()
    a, b = metrics_lines(tmp_path / "a"), metrics_lines(tmp_path / "b")
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([m["loss"] for m in b], [m["loss"] for m in a], rtol=1e-6)
    np.testing.assert_allclose([m["grad_norm"] for m in b], [m["grad_norm"] for m in a], rtol=1e-5)
    sa, pa = final_params(tmp_path / "a", None)
    sb, pb = final_params(tmp_path / "b", None)
    assert sa == sb == 6
    assert_trees_close(pa, pb, rtol=1e-6, atol=1e-7)
    # Resuming a finished run runs nothing and logs nothing twice.
    Trainer(config(ws, tmp_path / "b", steps=6, resume=True, **kw)).run()
    assert [m["step"] for m in metrics_lines(tmp_path / "b")] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------------
# 8. SIGKILL during training and during saves
# ---------------------------------------------------------------------------------------------------

def _train_argv(ws, out, steps, save_every):
    return ["train", "--model", ws["ckpt"]["stablelm"], "--data", ws["data"], "--out", str(out), "--steps", str(steps),
            "--batch-size", "4", "--seq-len", str(SEQ), "--lr", "1e-2", "--warmup", "2", "--schedule", "cosine",
            "--log-every", "1", "--save-every", str(save_every), "--keep", "2", "--dtype", "float32", "--quiet"]


def _start(argv):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, "-m", "jaxmodels.cli", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _kill_when(proc, ckpt_dir, ready, timeout=120):
    """Polls the checkpoint directory; SIGKILLs proc as soon as ready(entries) holds. Returns the entries."""
    end = time.time() + timeout
    while time.time() < end:
        entries = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
        if ready(entries):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return entries
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before the kill point: {proc.stderr.read()[-3000:]}")
        time.sleep(0.002)
    proc.kill()
    pytest.fail("kill point not reached")


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(ws, tmp_path):
    steps = 40
    ref = tmp_path / "ref"
    assert cli.main(_train_argv(ws, ref, steps, 1000)) == 0
    out = tmp_path / "run"
    ckpts = str(out / "checkpoints")

    def complete(entries):
        return [e for e in entries if e.isdigit()]

    # (a) during training, once the first checkpoint exists (save every 4 steps)
    _kill_when(_start(_train_argv(ws, out, steps, 4)), ckpts, lambda e: len(complete(e)) >= 1)
    # (b) during saves (save every step): at the first temporary directory after the n-th new checkpoint
    # (or, should the poll miss every temporary directory, two checkpoints later: saves are back to back)
    saw_tmp = 0
    for n in (1, 3):
        before = set(complete(os.listdir(ckpts)))

        appeared = set()  # --keep 2 deletes old checkpoints: count every step directory ever seen

        def ready(e, n=n, before=before, appeared=appeared):
            appeared.update(set(complete(e)) - before)
            return (len(appeared) >= n and any("tmp" in x for x in e)) or len(appeared) >= n + 2

        seen = _kill_when(_start(_train_argv(ws, out, steps, 1) + ["--resume"]), ckpts, ready)
        saw_tmp += any("tmp" in x for x in seen)
        # Never a half-written checkpoint under a step's name: every listed step restores its metadata.
        from jaxmodels.train.checkpoint import Checkpoints
        c = Checkpoints(str(out), read_only=True)
        assert c.all_steps()
        for s in c.all_steps():
            assert c.read_meta(s)["step"] == s
        c.close()
    assert saw_tmp >= 1, "no kill landed during a save"
    assert cli.main(_train_argv(ws, out, steps, 1) + ["--resume"]) == 0
    assert not [e for e in os.listdir(ckpts) if "tmp" in e]  # partial saves cleaned up
    a, b = metrics_lines(ref), metrics_lines(out)
    assert [m["step"] for m in b] == list(range(1, steps + 1))  # each step once
    np.testing.assert_allclose([m["loss"] for m in b], [m["loss"] for m in a], rtol=1e-6)
    assert_trees_close(final_params(ref, None)[1], final_params(out, None)[1], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# 9. Sharded == single device (8 simulated devices, subprocess)
# ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sharded_step_equals_single_device(ws, tmp_path):
    families = ("deepseek_v3", "stablelm")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "train_worker.py"), "sharded", str(tmp_path),
                           ",".join(ws["ckpt"][f] for f in families), ws["data"]],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    for family in families:
        batch = TrainData.from_jsonl(ws["data"], ws["ckpt"][family], seq_len=SEQ, progress=False).batch(0, 8)
        opts = steplib.StepOptions(bias_update_rate=1e-2 if family == "deepseek_v3" else 0.0)
        _, ref, m = one_step(ws["ckpt"][family], micro(batch, 1), opts=opts)
        want = {"params." + k: v for k, v in flat(ref["params"]).items()}
        want.update({"buffers." + k: v for k, v in flat(ref["buffers"]).items()})
        for mesh in ("fsdp=2,expert=2,tensor=2", "fsdp=8"):
            got = dict(np.load(os.path.join(tmp_path, f"{family}-{mesh}.npz")))
            np.testing.assert_allclose(got.pop("loss"), m["loss"], rtol=1e-5, err_msg=f"{family} {mesh}")
            assert_trees_close(got, want, rtol=1e-4, atol=1e-5)
    with open(os.path.join(tmp_path, "batch3.json")) as f:
        res = json.load(f)
    assert res["rc"] == 2 and "--batch-size 3" in res["stderr"] and "Traceback" not in res["stderr"]


# ---------------------------------------------------------------------------------------------------
# A finished full fine-tune of DeepSeek-V3 (eval data, checkpoints): metrics, export, resume errors
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def v3run(ws):
    out = ws["root"] / "v3run"
    trainer = Trainer(config(ws, out, family="deepseek_v3", eval_data=ws["eval"], steps=4, save_every=2,
                             eval_every=2))
    trainer.run()
    return trainer, str(out)


def test_metrics(ws, v3run):
    trainer, out = v3run
    lines = metrics_lines(out)
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    for m in lines:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "expert_load"):
            assert key in m, key
        assert np.isfinite(m["loss"]) and m["grad_norm"] > 0 and m["tokens_per_s"] > 0
        assert len(m["expert_load"]) == 8 and abs(sum(m["expert_load"]) - 1) < 1e-4
    np.testing.assert_allclose([m["lr"] for m in lines], [float(trainer.schedule(i)) for i in range(4)])
    assert lines[0]["lr"] == 0.0 and lines[1]["lr"] == pytest.approx(1e-2)  # warmup 1
    assert [m["step"] for m in lines if "eval_loss" in m] == [2, 4]
    assert lines[-1]["eval_loss"] == pytest.approx(trainer.evaluate()["eval_loss"], rel=1e-5)
    assert glob.glob(os.path.join(out, "tensorboard", "events.out.tfevents*"))


def test_export_matches_trained_model(ws, v3run, tmp_path):
    import transformers
    trainer, out = v3run
    dest = str(tmp_path / "hf")
    assert cli.main(["export", out, dest]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(1, 96, (2, SEQ))
    ours = np.asarray(trainer.model()(jnp.asarray(ids)).logits)
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(ids)).logits.numpy()
        base = ws["hf"]["deepseek_v3"](input_ids=torch.as_tensor(ids)).logits.numpy()
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    assert np.abs(base - ref).max() > 1e-2  # the export carries the trained weights, not the base
    for layer in hf.model.layers[hf.config.first_k_dense_replace:]:  # the trained routing bias too
        assert layer.mlp.gate.e_score_correction_bias.abs().sum() > 0
    assert os.path.isfile(os.path.join(dest, "tokenizer.json"))


# ---------------------------------------------------------------------------------------------------
# 10. Clear errors, no traceback
# ---------------------------------------------------------------------------------------------------

def test_cli_errors(ws, v3run, tmp_path, capsys):
    _, run_dir = v3run
    bad_json = write_jsonl(tmp_path / "bad.jsonl", ['{"text": "the cat"}', '{"text": "the'])
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"foo": "the cat"}])
    other_data = write_jsonl(tmp_path / "other.jsonl", texts(40, 5))
    afile = tmp_path / "afile"
    afile.write_text("x")
    base = dict(model=ws["ckpt"]["stablelm"], data=ws["data"], out=str(tmp_path / "out"))

    def argv(**kw):
        opts = {**base, "steps": "2", "batch-size": "2", "seq-len": str(SEQ), **kw}
        out = ["train"]
        for k, v in opts.items():
            if v is True:
                out.append(f"--{k}")
            elif v is not None:
                out.append(f"--{k}={v}")  # "=" so that "--lr=-1e-3" is not read as an option
        return out + ["--quiet"]

    cases = [
        (argv(data=str(tmp_path / "missing.jsonl")), "does not exist"),
        (argv(data=bad_json), "line 2"),
        (argv(data=unknown), "none of the known fields"),
        (argv(**{"seq-len": "128"}), "max_position_embeddings"),
        (argv(lr="0"), "--lr must be a positive"),
        (argv(lr="-1e-3"), "--lr must be a positive"),
        (argv(steps="0"), "--steps must be a positive"),
        (argv(**{"batch-size": "0"}), "--batch-size must be a positive"),
        (argv(out=str(afile / "run")), "not a writable directory"),
        (argv(out=str(tmp_path / "fresh"), resume=True), "no complete checkpoint"),
        (argv(out=run_dir, resume=True, steps="6"), "different model"),
        (argv(model=ws["ckpt"]["deepseek_v3"], data=other_data, out=run_dir, resume=True, steps="6",
              **{"batch-size": "4"}), "different training data"),
        (argv(model=ws["ckpt"]["deepseek_v3"], out=run_dir, resume=True, steps="6",
              **{"batch-size": "4", "lora-rank": "4"}), "different LoRA setting"),
        (argv(model=ws["ckpt"]["deepseek_v3"], out=run_dir, **{"batch-size": "4"}), "already holds checkpoints"),
        (["export", str(tmp_path), str(tmp_path / "exp")], "not a training run directory"),
    ]
    for args, message in cases:
        rc = cli.main(args)
        err = capsys.readouterr().err.strip()
        assert rc == 2, (args, err)
        assert message in err, (args, err)
        assert "Traceback" not in err and len(err.splitlines()) == 1, (args, err)
        assert err.startswith(f"jaxmodels {args[0]}: error:"), err


def test_default_lora_targets_export_as_a_peft_adapter(ws, tmp_path, capsys, caplog):
    """A DeepSeek LoRA run with the default targets exports with --adapter-only, and peft on the transformers
    base gives the trained model's logits; a run that names the dense MLP is told so at train start and gets
    a CLI remedy (not a Python one) from export, before any weights are loaded."""
    peft = pytest.importorskip("peft")
    import transformers

    out = tmp_path / "lora"
    trainer = Trainer(config(ws, out, family="deepseek_v3", steps=2, lora_rank=4, param_dtype="float32"))
    trainer.run()
    dest = tmp_path / "adapter"
    assert cli.main(["export", str(out), str(dest), "--adapter-only"]) == 0, capsys.readouterr().err
    base = transformers.AutoModelForCausalLM.from_pretrained(ws["ckpt"]["deepseek_v3"], dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, str(dest)).eval()
    ids = np.random.default_rng(0).integers(1, 96, (2, SEQ))
    ours = np.asarray(trainer.model()(jnp.asarray(ids)).logits)
    with torch.no_grad():
        ref = peft_model(input_ids=torch.as_tensor(ids)).logits.numpy()
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()

    mlp = tmp_path / "mlp"
    with caplog.at_level("WARNING", logger="jaxmodels.train"):
        Trainer(config(ws, mlp, family="deepseek_v3", steps=1, lora_rank=4,
                       lora_targets=("o_proj", "gate_proj", "up_proj", "down_proj"))).run()
    assert any("cannot be exported with --adapter-only" in r.message for r in caplog.records)
    capsys.readouterr()
    assert cli.main(["export", str(mlp), str(tmp_path / "no"), "--adapter-only"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "export without --adapter-only" in err and "merge_lora" not in err, err
    assert not (tmp_path / "no").exists()


def test_export_checks_the_output_path_before_loading(ws, v3run, tmp_path, capsys, monkeypatch):
    """An output path under a file or in a folder that refuses new entries is one line, before any weights
    are read."""
    from jaxmodels.train import export

    _, run_dir = v3run
    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setattr(export, "load_run", lambda *a, **k: pytest.fail("loaded weights before checking --out"))
    for out, message in ((afile / "out", "is under the file"), (afile, "is a file"),
                         ("/proc/jaxmodels-test/out", "cannot create anything in")):
        assert cli.main(["export", run_dir, str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err


# ---------------------------------------------------------------------------------------------------
# 12. Classification heads
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("head", ["sequence_classification", "token_classification"])
def test_classification_heads_train_and_match_transformers(ws, tmp_path, head):
    path, hf = make_checkpoint(tmp_path, "stablelm", head=head, num_labels=3)
    add_word_tokenizer(path)
    rng = np.random.default_rng(2)
    records = []
    for _ in range(24):
        words = list(rng.choice(WORDS[4:40], rng.integers(3, 12)))
        if head == "sequence_classification":
            records.append({"text": " ".join(words), "label": int(len(words) % 3)})
        else:
            records.append({"text": " ".join(words), "labels": [int(len(w) % 3) for w in words]})
    data = write_jsonl(tmp_path / "cls.jsonl", records)
    cfg = TrainConfig(model=path, data=data, eval_data=data, out=str(tmp_path / "run"), steps=8, batch_size=4,
                      seq_len=SEQ, lr=3e-3, warmup=0, schedule="constant", log_every=1, dtype="float32",
                      progress=False)
    trainer = Trainer(cfg)
    assert trainer.task == head
    start = trainer.evaluate()["eval_loss"]
    batch = trainer.data.batch(0, 4)  # what step 1 trains on
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(batch["input_ids"], dtype=torch.long),
                 attention_mask=torch.as_tensor(batch["attention_mask"], dtype=torch.long),
                 labels=torch.as_tensor(batch["labels"], dtype=torch.long)).loss.item()
    first = trainer.step()
    np.testing.assert_allclose(first["loss"], ref, rtol=1e-5)
    trainer.run()
    end = metrics_lines(cfg.out)[-1]["eval_loss"]
    assert end < start - 0.05, (start, end)
