"""dot_product_attention: the XLA path against a numpy reference, every other path against XLA.

On CPU: xla (reference math), splash in Pallas interpret mode. cuDNN runs only in the `gpu`-marked
test (skipped without a CUDA GPU): `python -m pytest -m gpu tests/test_attention.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmodels.inputs import Inputs
from jaxmodels.layers.attention import (
    PACKED_MAX_HEAD_DIM, causal_mask, choose_implementation, dot_product_attention, packed_segments, segment_mask)


def seg_inputs(seg):
    """The forward inputs of a full pass over rows with these segment ids (0 = padding)."""
    seg = jnp.asarray(seg, jnp.int32)
    return Inputs(positions=jnp.broadcast_to(jnp.arange(seg.shape[1], dtype=jnp.int32), seg.shape), segment_ids=seg)


def numpy_attention(q, k, v, mask, scale):
    """float64, one head and one example at a time: the oracle. Fully masked rows give NaN here."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, s, h, _ = q.shape
    kvh = k.shape[2]
    out = np.zeros((b, s, h, v.shape[-1]))
    for i in range(b):
        for j in range(h):
            kj = j // (h // kvh)  # query head j reads kv head j // group
            logits = q[i, :, j] @ k[i, :, kj].T * scale  # [s, t]
            logits = np.where(mask[i], logits, -np.inf)
            with np.errstate(invalid="ignore"):
                p = np.exp(logits - logits.max(-1, keepdims=True))
                p /= p.sum(-1, keepdims=True)
            out[i, :, j] = p @ v[i, :, kj]
    return out


def make_inputs(seed, b, s, h, kvh, dq, dv, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, s, h, dq), dtype)
    k = jax.random.normal(ks[1], (b, s, kvh, dq), dtype)
    v = jax.random.normal(ks[2], (b, s, kvh, dv), dtype)
    return q, k, v


def padded_mask(b, s):
    """Row 0 unpadded, row 1 left-padded by 3 (fully masked queries 0..2), row 2 right-padded by 5."""
    am = np.ones((b, s), np.int32)
    if b > 1:
        am[1, :3] = 0
    if b > 2:
        am[2, -5:] = 0
    return jnp.asarray(am)


def packed_ids(b, s, seed=0):
    """Rows of several documents (ids 1, 2, ...) with trailing padding (0), like a packed training batch."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((b, s), np.int32)
    for i in range(b):
        cuts = np.sort(rng.choice(np.arange(1, s - 4), size=3, replace=False))
        bounds = [0, *cuts, s - rng.integers(0, 4)]
        for d in range(len(bounds) - 1):
            ids[i, bounds[d]:bounds[d + 1]] = d + 1
    return jnp.asarray(ids)


CASES = {  # name: (b, s, heads, kv_heads, dq, dv)
    "mha": (2, 12, 4, 4, 16, 16),
    "gqa": (3, 12, 6, 2, 16, 16),
    "mqa": (2, 12, 4, 1, 8, 8),
    "mla": (2, 12, 4, 4, 24, 16),  # MLA: qk head dim != v head dim, kv_heads == heads
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("masking", ["causal", "padded", "segments"])
def test_xla_matches_numpy(case, masking):
    b, s, h, kvh, dq, dv = CASES[case]
    q, k, v = make_inputs(0, b, s, h, kvh, dq, dv)
    if masking == "causal":
        seg = jnp.ones((b, s), jnp.int32)
        mask = causal_mask(None, b, s)
    elif masking == "padded":
        seg = padded_mask(b, s)  # padding queries attend nothing (their rows are ignored)
        mask = causal_mask(seg, b, s) & (seg != 0)[:, :, None]
    else:
        seg = packed_ids(b, s)
        mask = segment_mask(seg)
    np.testing.assert_array_equal(np.asarray(seg_inputs(seg).dense_mask(s)), np.asarray(mask))
    scale = 0.3
    out = dot_product_attention(q, k, v, seg_inputs(seg), scale=scale, implementation="xla")
    assert out.shape == (b, s, h, dv)
    assert np.isfinite(np.asarray(out)).all()
    ref = numpy_attention(q, k, v, np.asarray(mask), scale)
    rows = np.asarray(mask).any(-1)  # queries with something to attend to
    np.testing.assert_allclose(np.asarray(out)[rows], ref[rows], rtol=1e-5, atol=1e-5)
    if not rows.all():
        # Fully masked rows (left padding): today's convention, a uniform average over all keys.
        uniform = np.repeat(np.asarray(v).mean(1, keepdims=True), h // kvh, axis=2)
        empty = np.nonzero(~rows)
        np.testing.assert_allclose(np.asarray(out)[empty], np.broadcast_to(uniform, out.shape)[empty],
                                   rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_have_finite_gradients():
    b, s, h, kvh, dq, dv = CASES["gqa"]
    q, k, v = make_inputs(1, b, s, h, kvh, dq, dv)
    inputs = seg_inputs(padded_mask(b, s))
    assert not np.asarray(inputs.dense_mask(s)).any(-1).all()  # the case really has fully masked rows

    def loss(q, k, v):
        return jnp.sum(dot_product_attention(q, k, v, inputs, scale=0.25, implementation="xla") ** 2)

    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()
        assert np.abs(np.asarray(g)).sum() > 0


def test_segment_mask_is_causal_mask_on_real_tokens():
    b, s = 3, 12
    am = padded_mask(b, s)
    seg_mask, dense = np.asarray(segment_mask(am)), np.asarray(causal_mask(am, b, s))
    real = np.asarray(am) != 0
    np.testing.assert_array_equal(seg_mask[real], dense[real])
    # Packed rows: no query sees another document or padding, every real query sees itself.
    ids = np.asarray(packed_ids(2, 16))
    m = np.asarray(segment_mask(jnp.asarray(ids)))
    for i in range(2):
        for x in range(16):
            for y in range(16):
                assert m[i, x, y] == (y <= x and ids[i, x] == ids[i, y] != 0)


def test_packed_segments_layout():
    ids = jnp.asarray([[0, 0, 1, 1, 1, 2, 2, 0],
                       [1, 1, 1, 1, 1, 1, 1, 1]], jnp.int32)
    offsets, lengths = packed_segments(ids)
    assert offsets.shape == (2, 9) and lengths.shape == (2, 8)
    np.testing.assert_array_equal(offsets[0, :5], [0, 2, 5, 7, -1])
    np.testing.assert_array_equal(lengths[0, :5], [2, 3, 2, 1, -1])
    np.testing.assert_array_equal(offsets[1, :2], [0, -1])
    np.testing.assert_array_equal(lengths[1, :2], [8, -1])
    assert (offsets[:, 5:] == -1).all() and (lengths[:, 5:] == -1).all()
    # Capped at M runs (what "cudnn_packed" passes cuDNN): the same runs while a row has at most M.
    offsets_m, lengths_m = packed_segments(ids, max_segments=4)
    assert offsets_m.shape == (2, 5) and lengths_m.shape == (2, 4)
    np.testing.assert_array_equal(offsets_m, offsets[:, :5])
    np.testing.assert_array_equal(lengths_m, lengths[:, :4])


def test_choice_on_cpu_and_clear_errors():
    q, k, v = make_inputs(0, 1, 128, 4, 2, 16, 16, jnp.bfloat16)
    seg = seg_inputs(jnp.ones((1, 128), jnp.int32))
    assert jax.default_backend() == "cpu"
    assert choose_implementation(q, k, v, seg) == "xla"
    assert choose_implementation(q, k, v, seg, "auto") == "xla"
    assert choose_implementation(q, k, v, seg, "splash") == "splash"  # interpret mode off TPU
    with pytest.raises(ValueError, match="cudnn"):
        choose_implementation(q, k, v, seg, "cudnn")
    with pytest.raises(ValueError, match="not one of"):
        choose_implementation(q, k, v, seg, "flash")
    with pytest.raises(ValueError, match="segment_ids"):
        dot_product_attention(q, k, v, seg_inputs(jnp.ones((1, 64), jnp.int32)), scale=1.0)
    # A decode step over a cache runs XLA whatever the options say (the fused kernels are full-row kernels).
    from jaxmodels.inputs import decode_inputs
    from jaxmodels.options import Options
    step = decode_inputs(jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 128), bool), 5, Options(attention="splash"))
    assert choose_implementation(q[:, :1], k, v, step) == "xla"


def test_cudnn_packed_refuses_mla_head_dims(monkeypatch):
    """cuDNN's packed layout crashed the GPU at MLA's head dim 192 (H100, jax 0.11.2): on a (simulated) Hopper
    with cuDNN it is refused with the reason, while StableLM's 80 is accepted and auto keeps "cudnn"."""
    from jaxmodels.layers import attention as A

    monkeypatch.setattr(A, "_cuda_facts", lambda: ((9, 0), 91000))
    monkeypatch.setattr(A, "_cudnn_module", lambda: object())
    seg = jnp.ones((1, 128), jnp.int32)
    mla = make_inputs(0, 1, 128, 4, 4, 192, 128, jnp.bfloat16)
    with pytest.raises(ValueError, match="head dim 192.*'cudnn' runs"):
        choose_implementation(*mla, seg_inputs(seg), "cudnn_packed")
    assert A._cudnn_unsupported(*mla, seg, packed=False) is None  # "cudnn" takes it
    stablelm = make_inputs(0, 1, 128, 4, 4, 80, 80, jnp.bfloat16)
    assert choose_implementation(*stablelm, seg_inputs(seg), "cudnn_packed") == "cudnn_packed"


SPLASH_CASES = {  # name: (b, s, heads, kv_heads, dq, dv); splash needs seq multiples of 128
    "gqa": (2, 256, 4, 2, 32, 32),
    "mla": (1, 256, 2, 2, 48, 32),
}


@pytest.mark.parametrize("case", list(SPLASH_CASES))
def test_splash_interpret_matches_xla(case):
    """Pallas splash attention in interpret mode (the TPU kernel's logic on CPU), forward and gradients."""
    b, s, h, kvh, dq, dv = SPLASH_CASES[case]
    q, k, v = make_inputs(2, b, s, h, kvh, dq, dv)
    seg = packed_ids(b, s, seed=3)
    real = (seg != 0)[:, :, None, None]  # padding queries differ by design (any finite value is fine)
    w = jax.random.normal(jax.random.key(9), (b, s, h, dv))

    def loss(impl, q, k, v):
        out = dot_product_attention(q, k, v, seg_inputs(seg), scale=dq ** -0.5, implementation=impl)
        return jnp.sum(jnp.where(real, out * w, 0.0)), out

    (_, out_x), g_x = jax.value_and_grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    (_, out_s), g_s = jax.value_and_grad(lambda *a: loss("splash", *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    assert np.isfinite(np.asarray(out_s)).all()
    np.testing.assert_allclose(np.where(real, out_s, 0), np.where(real, out_x, 0), rtol=2e-4, atol=2e-4)
    for a, b_ in zip(g_s, g_x):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(a, b_, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("family", ["stablelm", "deepseek_v2"])
def test_layers_take_inputs_and_the_models_attention_option(family):
    """A layer takes (x, inputs, cache): the same output from the model's own forward inputs as from inputs
    built by hand; the model's Options.attention reaches every attention block through the inputs (splash
    refuses a row of 10 tokens, "xla" equals the default)."""
    import tiny
    from jaxmodels.config import config_from_hf
    from jaxmodels.model import CausalLM
    from jaxmodels.options import Options

    cfg = config_from_hf({**tiny.TINY[family], "model_type": family})
    model = CausalLM(cfg, rngs=nnx.Rngs(0), std=0.2, options=Options(attention="xla"))
    assert model.options.attention == "xla"
    stack = next(iter(model.model.stacks().values()))
    layer = stack.layer(0)
    b, s = 2, 10
    x = jax.random.normal(jax.random.key(0), (b, s, cfg.hidden_size))
    am = padded_mask(b, s)
    ids = jnp.ones((b, s), jnp.int32)
    got, _, _ = layer(x, model.inputs(ids, am).with_rope(cfg))
    want, _, _ = layer(x, seg_inputs(am).replace(options=Options(attention="xla")).with_rope(cfg))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(model(ids, am).logits),
                                  np.asarray(model.with_options(attention="auto")(ids, am).logits))
    with pytest.raises(ValueError, match="splash.*multiples of 128"):
        model.with_options(attention="splash")(ids, am)


@pytest.mark.parametrize("family", ["stablelm", "deepseek_v3"])
def test_prompt_forwards_give_attention_segments(family, monkeypatch):
    """Prefill (left-padded prompts) and an unmasked forward pass hand attention segment ids whose dense form is
    the causal padding mask on every real query (what the fused kernels read instead of a dense mask), and
    decode steps hand the cache's slots."""
    import tiny
    from jaxmodels.config import config_from_hf
    from jaxmodels.generate.steps import _decode, _prefill
    from jaxmodels.layers import attention, mla
    from jaxmodels.model import CausalLM

    seen = []

    def spy(q, k, v, inputs, *, scale, implementation=None):
        seen.append(inputs.mode)
        t = k.shape[1]
        real = np.asarray(inputs.segment_ids) != 0
        if inputs.mode != "decode":
            np.testing.assert_array_equal(np.asarray(inputs.dense_mask(t))[real],
                                          np.asarray(causal_mask(inputs.segment_ids, *inputs.segment_ids.shape))[real])
        return dot_product_attention(q, k, v, inputs, scale=scale, implementation=implementation)

    monkeypatch.setattr(attention, "dot_product_attention", spy)
    monkeypatch.setattr(mla, "dot_product_attention", spy)
    cfg = config_from_hf({**tiny.TINY[family], "model_type": family})
    model = CausalLM(cfg, rngs=nnx.Rngs(0), std=0.2, options={"scan": False})  # eager layers: concrete inputs
    ids = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (3, 10)), jnp.int32)
    am = jnp.asarray(np.array([[1] * 10, [0] * 3 + [1] * 7, [0] * 9 + [1]], np.int32))
    _, cache, kv_valid, pos = _prefill(model, ids, am, 16)
    model(ids)
    assert seen and set(seen) == {"prefill", "train"}
    _decode(model, cache, ids[:, 0], pos, kv_valid, 10)
    if family == "stablelm":  # (MLA's decode attends over the latent itself, not through this entry)
        assert seen[-1] == "decode"


# ------------------------------------------------------------------------------------------------ GPU


def _has_cuda():
    try:
        return any("cuda" in d.client.platform_version.lower() for d in jax.devices("gpu"))
    except RuntimeError:
        return False


GPU_CASES = {  # name: (b, s, heads, kv_heads, dq, dv, packed segments?)
    "stablelm_1x2048": (1, 2048, 32, 32, 80, 80, False),
    "stablelm_gqa_2x1024": (2, 1024, 32, 8, 80, 80, False),
    "mla_v2lite_1x2048": (1, 2048, 16, 16, 192, 128, False),
    "stablelm_packed_8x1024": (8, 1024, 32, 32, 80, 80, True),
    "mla_packed_4x1024": (4, 1024, 16, 16, 192, 128, True),
    # one unpadded document per row ("causal"): a forward pass runs cuDNN's plain causal mask, no bias
    "stablelm_causal_2x1024": (2, 1024, 32, 8, 80, 80, "causal"),
    "mla_causal_1x2048": (1, 2048, 16, 16, 192, 128, "causal"),
}


def rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_cudnn_matches_xla_bf16(case):
    b, s, h, kvh, dq, dv, packed = GPU_CASES[case]
    q, k, v = make_inputs(4, b, s, h, kvh, dq, dv, jnp.bfloat16)
    if packed == "causal":
        seg = jnp.ones((b, s), jnp.int32)
        packed = False
    elif packed:
        seg = packed_ids(b, s, seed=5)
    else:
        seg = padded_mask(b, s)
    mask = segment_mask(seg)
    rows = np.asarray(mask).any(-1)
    real = jnp.asarray(rows if not packed else np.asarray(seg) != 0)[:, :, None, None]
    w = jax.random.normal(jax.random.key(9), (b, s, h, dv), jnp.float32)
    scale = dq ** -0.5

    def run(impl, q, k, v):
        def loss(q, k, v):
            out = dot_product_attention(q, k, v, seg_inputs(seg), scale=scale, implementation=impl)
            return jnp.sum(jnp.where(real, out.astype(jnp.float32) * w, 0.0)), out
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    # The oracle: XLA in float32 on the same bf16 inputs. cuDNN (bf16) must be about as close to it as
    # XLA in bf16 is.
    (_, out_ref), g_ref = run("xla", *(x.astype(jnp.float32) for x in (q, k, v)))
    (_, out_x), g_x = run("xla", q, k, v)
    impls = ["cudnn"] + (["cudnn_packed"] if packed and dq <= PACKED_MAX_HEAD_DIM else [])
    if packed and dq > PACKED_MAX_HEAD_DIM:  # (it crashed the GPU with MLA's 192: refused instead)
        with pytest.raises(ValueError, match="packed layout crashed"):
            run("cudnn_packed", q, k, v)
    for impl in impls:
        (_, out_c), g_c = run(impl, q, k, v)
        out_c = np.where(real, np.asarray(out_c, np.float32), 0)
        assert np.isfinite(np.asarray(out_c)).all(), impl
        base = rel_err(np.where(real, np.asarray(out_x, np.float32), 0), np.where(real, out_ref, 0))
        err = rel_err(out_c, np.where(real, out_ref, 0))
        assert err < max(2 * base, 1e-2), (impl, "out", err, base)
        if seg is not None and impl == "cudnn":  # the forward pass alone (it may choose the bias-free kernel)
            out_f = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, seg_inputs(seg), scale=scale,
                                                                  implementation=impl))(q, k, v)
            err = rel_err(np.where(real, np.asarray(out_f, np.float32), 0), np.where(real, out_ref, 0))
            assert err < max(2 * base, 1e-2), (impl, "forward-only out", err, base)
        for name, gc, gx, gr in zip("qkv", g_c, g_x, g_ref):
            assert np.isfinite(np.asarray(gc, np.float32)).all(), (impl, name)
            base, err = rel_err(gx, gr), rel_err(gc, gr)
            assert err < max(2 * base, 2e-2), (impl, "d" + name, err, base)


def test_cudnn_segments_forward_drops_the_bias_for_one_document_rows(monkeypatch):
    """The "cudnn" path with segment ids: a forward pass over rows that are each one unpadded document runs
    plain causal attention (no bias); padded or packed rows, and every differentiated pass, run the bias
    path. The two kernels are stood in for by XLA attention, the bias-free one marked by + 1."""
    from jaxmodels.layers import attention as A

    def fake_cudnn(q, k, v, mask, scale, causal):  # mask None: the bias-free causal kernel, marked by + 1
        if mask is None:
            assert causal
            return A._xla_attention(q, k, v, segment_mask(jnp.ones(q.shape[:2], jnp.int32)), scale) + 1.0
        return A._xla_attention(q, k, v, mask, scale)

    monkeypatch.setattr(A, "_cudnn_attention", fake_cudnn)
    b, s = 2, 16
    q, k, v = make_inputs(1, b, s, 4, 2, 8, 8)
    cases = {"one document": jnp.ones((b, s), jnp.int32), "left padding": jnp.asarray(padded_mask(b, s)),
             "packed": jnp.asarray(packed_ids(b, s, seed=2))}
    for name, seg in cases.items():
        mask = segment_mask(seg)
        want = A._xla_attention(q, k, v, mask, 0.3)

        def f(q, k, v):
            return A._cudnn_segment_attention(q, k, v, seg, 0.3)

        got = jax.jit(f)(q, k, v)
        offset = 1.0 if name == "one document" else 0.0
        np.testing.assert_allclose(got, want + offset, rtol=1e-5, atol=1e-5, err_msg=name)

        def loss(q, k, v):
            return jnp.sum(jnp.sin(f(q, k, v)))

        value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
        ref_value, ref_grads = jax.value_and_grad(
            lambda q, k, v: jnp.sum(jnp.sin(A._xla_attention(q, k, v, mask, 0.3))), argnums=(0, 1, 2))(q, k, v)
        np.testing.assert_allclose(value, ref_value, rtol=1e-5, err_msg=name)  # the bias path, differentiated
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5, err_msg=name)
        assert "cond" not in str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))


def _count_primitive(jaxpr, name: str) -> int:
    """How many `name` equations a jaxpr runs, nested jaxprs (remat, pjit, custom rules) included."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += _count_primitive(inner, name)
    return n


def test_lean_remat_keeps_the_cudnn_residuals(monkeypatch):
    """--remat lean saves what the cuDNN backward kernel reads (named in the custom VJP's forward) and the
    attention output, so the backward pass never runs the attention forward kernel again, while "full"
    does; the gradients are those without remat. The kernel is stood in for by XLA attention: its softmax's
    `exp` marks each forward run."""
    from jaxmodels.layers import attention as A
    from jaxmodels.layers.stack import REMAT_POLICIES

    monkeypatch.setattr(A, "_cudnn_attention", lambda q, k, v, mask, scale, causal: A._xla_attention(
        q, k, v, segment_mask(jnp.ones(q.shape[:2], jnp.int32)) if mask is None else mask, scale))
    b, s, h, d = 2, 16, 4, 8
    q, k, v = make_inputs(3, b, s, h, h, d, d)
    w = jax.random.normal(jax.random.key(4), (h * d, h * d)) * 0.3
    seg = jnp.asarray(packed_ids(b, s, seed=1))

    def layer(q, k, v, w):  # attention, then a projection of its output and a nonlinearity after it
        out = dot_product_attention(q, k, v, seg_inputs(seg), scale=0.3, implementation="cudnn")
        return jnp.sum(jnp.tanh(out.reshape(b, s, h * d) @ w))

    monkeypatch.setattr(A, "_cudnn_unsupported", lambda *args, **kw: None)  # "cudnn" on CPU (float32)
    ref = jax.grad(layer, argnums=(0, 1, 2, 3))(q, k, v, w)
    exps = {}
    for policy in ("lean", "full"):
        f = jax.checkpoint(layer, policy=REMAT_POLICIES[policy])
        grads = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(q, k, v, w)
        for g, r in zip(grads, ref):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6, err_msg=policy)
        exps[policy] = _count_primitive(jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2, 3)))(q, k, v, w).jaxpr, "exp")
    assert exps["full"] > exps["lean"] >= 1, exps  # full runs the forward kernel again; lean does not
