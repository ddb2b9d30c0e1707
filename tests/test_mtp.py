"""DeepSeek-V3 multi-token prediction: loading / export of the MTP layer, its training forward and loss terms,
and self-speculative decoding (greedy identical to plain greedy; sampling keeps the distribution)."""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmodels
from jaxmodels.config import DeepseekV3Config
from jaxmodels.convert.keymap import CheckpointError
from jaxmodels.generate import GenerationError
from jaxmodels.layers.mtp import mtp_hidden, mtp_logits, num_mtp_layers
from jaxmodels.train.loss import IGNORE, mtp_loss_terms, mtp_targets
from tiny import TINY, make_checkpoint
from test_convert import params, read_tensors, write_checkpoint

N = TINY["deepseek_v3"]["num_hidden_layers"]


def mtp_tensors(tensors: dict, seed: int = 0, std: float = 0.15) -> dict:
    """Random MTP tensors for layer N, in the hub layout (an MoE decoder layer shaped like layer N-1, the
    MTP projections and norms, and copies of the embedding and head)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, x in tensors.items():
        if key.startswith(f"model.layers.{N - 1}."):
            new = key.replace(f"model.layers.{N - 1}.", f"model.layers.{N}.")
            if "norm" in key:
                out[new] = (1.0 + 0.3 * rng.standard_normal(x.shape)).astype(np.float32)
            else:
                out[new] = (std * rng.standard_normal(x.shape)).astype(np.float32)
    h = tensors["model.embed_tokens.weight"].shape[1]
    out[f"model.layers.{N}.eh_proj.weight"] = (std * rng.standard_normal((h, 2 * h))).astype(np.float32)
    for n in ("enorm", "hnorm", "shared_head.norm"):
        out[f"model.layers.{N}.{n}.weight"] = (1.0 + 0.3 * rng.standard_normal(h)).astype(np.float32)
    out[f"model.layers.{N}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"]
    out[f"model.layers.{N}.shared_head.head.weight"] = tensors["lm_head.weight"]
    return out


@pytest.fixture(scope="module")
def mtp_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("mtp")
    src, hf = make_checkpoint(root, "deepseek_v3")
    tensors = read_tensors(src)
    extra = mtp_tensors(tensors)
    path = write_checkpoint(src, root / "with-mtp", {**tensors, **extra})
    return os.fspath(path), src, tensors, extra


def load(path, **kw):
    return jaxmodels.from_pretrained(os.fspath(path), progress=False, **kw)


# ----------------------------------------------------------------------------------------------- load / export
def test_mtp_layer_loaded_and_round_trips(tmp_path, mtp_ckpt):
    path, src, tensors, extra = mtp_ckpt
    model = load(path)
    assert num_mtp_layers(model) == 1
    p = params(model)
    np.testing.assert_array_equal(p["model.mtp_layers.layers.eh_proj.weight"][0], extra[f"model.layers.{N}.eh_proj.weight"])
    np.testing.assert_array_equal(p["model.mtp_layers.layers.hnorm.weight"][0], extra[f"model.layers.{N}.hnorm.weight"])
    np.testing.assert_array_equal(p["model.mtp_layers.layers.mlp.experts.down_proj"][0, 5],
                                  extra[f"model.layers.{N}.mlp.experts.5.down_proj.weight"].T)
    # The rest of the model is what loads without the MTP layer; mtp=False skips it as before.
    plain = params(load(src))
    for k, v in plain.items():
        np.testing.assert_array_equal(p[k], v, err_msg=k)
    assert num_mtp_layers(load(path, mtp=False)) == 0
    assert num_mtp_layers(load(src)) == 0  # transformers' checkpoints have no MTP tensors: loads as before
    with pytest.raises(CheckpointError, match="mtp=True"):
        load(src, mtp=True)
    # Export writes the hub layout back, the shared copies included, tensor for tensor.
    out = tmp_path / "out"
    jaxmodels.save_pretrained(model, out, progress=False)
    back = read_tensors(out)
    want = {**tensors, **extra}
    assert sorted(back) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(back[k], want[k], err_msg=k)
    # convert_checkpoint (streaming, no model) writes the same.
    from jaxmodels.convert.hf import convert_checkpoint
    conv = tmp_path / "conv"
    convert_checkpoint(path, conv, jnp.float32, progress=False)
    got = read_tensors(conv)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_mtp_shared_copy_must_match(tmp_path, mtp_ckpt):
    path, src, tensors, extra = mtp_ckpt
    bad = dict(extra)
    bad[f"model.layers.{N}.shared_head.head.weight"] = extra[f"model.layers.{N}.shared_head.head.weight"] + 1.0
    p = write_checkpoint(src, tmp_path / "bad", {**tensors, **bad})
    with pytest.raises(CheckpointError, match="shares the main embedding and head"):
        load(p)
    assert num_mtp_layers(load(p, mtp=False)) == 0
    incomplete = {k: v for k, v in extra.items() if "hnorm" not in k}
    p = write_checkpoint(src, tmp_path / "incomplete", {**tensors, **incomplete})
    with pytest.raises(CheckpointError, match="hnorm"):
        load(p)


# ----------------------------------------------------------------------------------------------- forward / loss
def _mtp_reference(model, h, ids):
    """MTP depth 0 written out by hand from the layer's parts, for an unpadded batch."""
    layer_state = jax.tree.map(lambda a: a[0], nnx.state(model.model.mtp_layers.layers))
    layer = nnx.merge(nnx.graphdef(model.model.mtp_layers.layers), layer_state)
    cfg = model.config
    b, s = ids.shape
    nxt = jnp.concatenate([ids[:, 1:], jnp.zeros((b, 1), ids.dtype)], axis=1)
    e = model.model.embed_tokens(nxt)
    x = layer.eh_proj(jnp.concatenate([layer.enorm(e), layer.hnorm(h)], -1))  # [enorm(emb) ; hnorm(h)]
    from jaxmodels.inputs import forward_inputs
    from jaxmodels.layers.deepseek_layer import DeepseekLayer
    y, _, _ = DeepseekLayer.__call__(layer, x, forward_inputs(ids).with_rope(cfg))
    return model.logits(layer.shared_head.norm(y))


def test_mtp_forward_matches_its_definition_and_respects_segments(mtp_ckpt):
    model = load(mtp_ckpt[0])
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 96, size=(2, 12)))
    h = model.hidden(ids)
    got = mtp_logits(model, h, ids)[0]
    np.testing.assert_allclose(got, _mtp_reference(model, h, ids), rtol=1e-5, atol=1e-5)
    # Packed rows: two documents in one row give the MTP outputs each gives alone (positions restart,
    # attention stays inside the document); the shifted token at the boundary only affects the last
    # index of the first document, whose target is masked.
    a, b = ids[0, :5], ids[1, :7]
    packed = jnp.concatenate([a, b])[None]
    seg = jnp.asarray([[1] * 5 + [2] * 7])
    hp = model.hidden(packed, segment_ids=seg)
    hp_mtp = mtp_hidden(model, hp, packed, segment_ids=seg)[0]
    for doc, sl in ((a, slice(0, 4)), (b, slice(5, 11))):  # all indices whose shifted token is in the document
        alone = mtp_hidden(model, model.hidden(doc[None]), doc[None])[0]
        np.testing.assert_allclose(hp_mtp[0, sl], alone[0, : sl.stop - sl.start], rtol=2e-5, atol=2e-5)
    t = mtp_targets(packed, 0, seg)
    # depth 0 at index i predicts token i+2: counted only while i+2 is in the same document
    assert list(np.asarray(t[0] != IGNORE)) == [True] * 3 + [False] * 2 + [True] * 5 + [False] * 2


def test_mtp_loss_terms(mtp_ckpt):
    model = load(mtp_ckpt[0])
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(1, 96, size=(2, 10)))
    mask = jnp.ones_like(ids).at[0, :3].set(0)
    h = model.hidden(ids, attention_mask=mask)
    (total, count, right), = mtp_loss_terms(model, h, {"input_ids": ids, "attention_mask": mask})
    logits = np.asarray(mtp_logits(model, h, ids, attention_mask=mask)[0], np.float64)
    want, n, r = 0.0, 0, 0
    for bi in range(2):
        for i in range(10 - 2):
            if mask[bi, i]:
                lp = logits[bi, i] - np.log(np.exp(logits[bi, i]).sum())
                want -= lp[int(ids[bi, i + 2])]
                n += 1
                r += int(np.argmax(logits[bi, i]) == int(ids[bi, i + 2]))
    assert int(count) == n == 2 * 8 - 3 and int(right) == r
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    # Gradients reach the MTP parameters.
    graphdef, state = nnx.split(model)

    def f(st):
        m = nnx.merge(graphdef, st)
        (t, c, _), = mtp_loss_terms(m, m.hidden(ids, attention_mask=mask), {"input_ids": ids, "attention_mask": mask})
        return t / c
    g = jax.grad(f)(state)
    assert float(jnp.abs(g["model"]["mtp_layers"]["layers"]["eh_proj"]["weight"][...]).sum()) > 0


# ----------------------------------------------------------------------------------------------- speculative
def drafting_model(seed: int = 0, quality: float = 1.0, main_scale: float = 0.1, mtp_scale: float = 0.1):
    """A tiny V3 with an MTP layer whose drafts are often right: the main layers' outputs are scaled down (so
    the next token depends mostly, not only, on the current one), and the MTP layer projects the next
    token's embedding through (eh_proj ~ [I, 0]) with the main final norm as its head norm."""
    cfg = DeepseekV3Config.from_hf({**TINY["deepseek_v3"], "model_type": "deepseek_v3", "initializer_range": 0.15})
    model = jaxmodels.CausalLM(cfg, rngs=nnx.Rngs(seed), std=0.15, num_mtp_layers=1)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        names = [str(x) for x in path]
        if "o_proj" in names or "down_proj" in names:
            var.set_value(var.get_value() * (mtp_scale if "mtp_layers" in names else main_scale))
    mtp = model.model.mtp_layers.layers
    h = cfg.hidden_size
    eye = jnp.concatenate([jnp.eye(h), jnp.zeros((h, h))], axis=1)[None]
    mtp.eh_proj.weight[...] = quality * eye + (1 - quality) * mtp.eh_proj.weight[...]
    mtp.enorm.weight[...] = jnp.ones_like(mtp.enorm.weight[...])
    mtp.shared_head.norm.weight[...] = model.model.norm.weight[...][None]
    return model


def test_speculative_greedy_identical_padded(tmp_path):
    model = drafting_model()
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 96, size=(4, 9))
    mask = np.ones_like(ids)
    mask[0, :4] = 0
    ids[0, :4] = 0
    mask[2, :1] = 0
    ids[2, :1] = 0
    plain = jaxmodels.generate(model, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[])
    spec, st = jaxmodels.generate(model, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[],
                                  speculative=True, return_stats=True)
    np.testing.assert_array_equal(spec, plain)
    print("stats", st)
    assert 0.2 < st["acceptance_rate"] < 1.0  # both paths (accept, reject) are exercised
    assert st["steps"] < 19  # fewer forward passes than tokens
    # Each row alone gives the same tokens (rows advance by different amounts in the batch).
    for r in range(4):
        keep = mask[r] != 0
        alone = jaxmodels.generate(model, ids[r:r + 1, keep], max_new_tokens=20, eos_token_id=[], speculative=True)
        np.testing.assert_array_equal(alone[0, keep.sum():], spec[r, 9:])


def test_speculative_eos_and_max_new_mid_draft():
    model = drafting_model(seed=1)
    rng = np.random.default_rng(2)
    ids = rng.integers(1, 96, size=(3, 6))
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    ids[1, :2] = 0
    ref = jaxmodels.generate(model, ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[])
    _, st = jaxmodels.generate(model, ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[], speculative=True,
                               return_stats=True)
    assert st["accepted"] > 0
    # EOS = tokens that appear in the continuations, so rows stop at different steps, some inside an
    # accepted draft (the token after the EOS must not be emitted).
    gen = ref[:, 6:]
    for eos in {int(gen[0, 5]), int(gen[1, 9]), int(gen[2, 3])}:
        for max_new in (1, 2, 7, 8, 13, 24):
            plain = jaxmodels.generate(model, ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=eos,
                                       pad_token_id=0)
            spec = jaxmodels.generate(model, ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=eos,
                                      pad_token_id=0, speculative=True)
            np.testing.assert_array_equal(spec, plain, err_msg=f"eos={eos} max_new={max_new}")


def test_speculative_streams_columns_in_order():
    model = drafting_model()
    ids = np.random.default_rng(3).integers(1, 96, size=(2, 5))
    got = []
    out = jaxmodels.generate(model, ids, max_new_tokens=11, eos_token_id=[], speculative=True,
                             streamer=lambda step, toks: got.append((step, np.asarray(toks).copy())))
    assert [s for s, _ in got] == list(range(11))
    np.testing.assert_array_equal(np.stack([t for _, t in got], 1), out[:, 5:])


def test_cached_multi_token_verify_equals_full_forward():
    """Feeding 2 tokens at once through the absorbed decode path over the cache gives the full forward's logits."""
    from jaxmodels.generate import prefill
    from jaxmodels.inputs import decode_inputs

    model = drafting_model()
    ids = jnp.asarray(np.random.default_rng(4).integers(1, 96, size=(2, 10)))
    full = model(ids).logits
    _, cache, kv_valid, pos = prefill(model, ids[:, :7], cache_len=16)
    inputs = decode_inputs(pos[:, None] + jnp.arange(3)[None], kv_valid, 7, model.options)  # slots 7, 8, 9
    h, _ = model.model(ids[:, 7:10], inputs, cache)
    np.testing.assert_allclose(model.logits(h), full[:, 7:10], rtol=1e-4, atol=1e-4)


def test_speculative_needs_mtp(mtp_ckpt):
    model = load(mtp_ckpt[1])
    with pytest.raises(GenerationError, match="multi-token-prediction"):
        jaxmodels.generate(model, np.array([[1, 2, 3]]), max_new_tokens=3, speculative=True)


def test_speculative_sampling_keeps_the_distribution():
    """Rejection sampling: the distribution of the 2nd and 3rd new token (after a draft was verified) equals
    plain sampling's. A chi-square test over many seeds on a tiny vocabulary (few tokens carry the mass)."""
    model = drafting_model(quality=0.8)
    ids = np.tile(np.array([[5, 17, 33]]), (256, 1))
    kw = dict(max_new_tokens=3, do_sample=True, temperature=1.5, top_k=6, eos_token_id=[])
    spec, st = jaxmodels.generate(model, ids, seed=1, speculative=True, return_stats=True, **kw)
    assert 0.1 < st["acceptance_rate"] < 0.95, st
    plain = np.concatenate([jaxmodels.generate(model, ids, seed=s, **kw) for s in (7, 8)])
    spec = np.concatenate([spec, jaxmodels.generate(model, ids, seed=2, speculative=True, **kw)])
    from scipy.stats import chi2_contingency
    for col in (4, 5):
        a, b = spec[:, col], plain[:, col]
        cats = sorted(set(a) | set(b))
        table = np.array([[np.sum(a == c) for c in cats], [np.sum(b == c) for c in cats]])
        table = table[:, table.sum(0) >= 5]
        p = chi2_contingency(table)[1]
        print("col", col, "p", p, table)
        assert p > 1e-3


def test_speculative_identical_when_one_row_steps_round_differently(monkeypatch):
    """GPUs run a 1-token decode step with matrix-vector kernels whose rounding differs from the 2-token verify's
    matrix kernels, which flips near-tied argmaxes. Simulated here: every Linear layer adds a small offset when it
    sees a single token per row. Greedy decoding of a model with MTP layers runs the verify's 2-token shapes
    (_decode_paired), so speculative output still equals plain output exactly; the 1-token path would not."""
    from jaxmodels.generate import steps as G
    from jaxmodels.layers.linear import Linear

    call = Linear.__call__

    def one_row_rounds_differently(self, x):
        y = call(self, x)
        if x.ndim >= 3 and x.shape[-2] == 1:
            y = y + 0.05 * jnp.sin(jnp.arange(y.shape[-1], dtype=y.dtype))
        return y

    monkeypatch.setattr(Linear, "__call__", one_row_rounds_differently)
    model = drafting_model(seed=2)
    ids = np.random.default_rng(5).integers(1, 96, size=(2, 9))
    kw = dict(max_new_tokens=30, eos_token_id=[])
    jax.clear_caches()
    try:
        spec, stats = jaxmodels.generate(model, ids, speculative=True, return_stats=True, **kw)
        plain = jaxmodels.generate(model, ids, **kw)
        monkeypatch.setattr(G, "_has_mtp", lambda m: False)  # the 1-token decode step instead
        jax.clear_caches()  # read at trace time
        one_row = jaxmodels.generate(model, ids, **kw)
    finally:
        jax.clear_caches()
    assert stats["accepted"] > 0
    np.testing.assert_array_equal(spec, plain)
    assert (one_row != plain).any()  # the simulated rounding does change tokens on the 1-token path
