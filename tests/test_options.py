"""Options (jaxmodels.options) and forward inputs (jaxmodels.inputs): static choices given at construction,
part of the compiled program; one input object built in one place."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmodels
import tiny
from jaxmodels.config import config_from_hf
from jaxmodels.inputs import decode_inputs, forward_inputs, prefill_inputs
from jaxmodels.layers.attention import causal_mask, segment_mask
from jaxmodels.model import CausalLM
from jaxmodels.options import Options, OptionsError


def tiny_model(family="deepseek_v3", **options):
    cfg = config_from_hf({**tiny.TINY[family], "model_type": family})
    return CausalLM(cfg, rngs=nnx.Rngs(0), std=0.2, options=options or None)


def test_options_are_frozen_hashable_and_checked():
    o = Options(compute_dtype=jnp.bfloat16, rules={"batch": ["data"]})
    assert o.compute_dtype == "bfloat16" and o.dtype == jnp.bfloat16
    assert hash(o) == hash(Options(compute_dtype="bfloat16", rules={"batch": ("data",)}))
    assert o.rules_table["batch"] == ("data",)
    with pytest.raises(AttributeError):
        o.remat = "full"
    for field, bad in (("attention", "flash"), ("remat", "some"), ("grouped_matmul", "triton"),
                       ("gather_form", "loop"), ("compute_dtype", "int8")):
        with pytest.raises(OptionsError, match=field):
            Options(**{field: bad})


def test_flipping_an_option_compiles_a_new_program_that_reflects_it():
    """The options live in the graph definition: a jitted function of (graphdef, state) traces once per
    options and the result follows them (compute dtype: bf16 activations; scan: no scan primitive)."""
    model = tiny_model()
    traces = []
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 96, (2, 8)), jnp.int32)

    def run(m):
        graphdef, state = nnx.split(m)
        return jax.jit(lambda st, i: nnx.merge(graphdef, st).hidden(i))(state, ids), graphdef

    f32, g_f32 = run(model)
    bf16_model = model.with_options(compute_dtype="bfloat16")
    bf16, g_bf16 = run(bf16_model)
    assert g_f32 != g_bf16  # a new static program key
    assert model.options.compute_dtype is None  # the original model keeps its options
    assert f32.dtype == jnp.float32 and bf16.dtype == jnp.bfloat16
    # Mean, not max: a bf16 rounding may flip one token's top-k expert choice in the tiny random MoE, which moves
    # that token's hidden state a lot without meaning a wrong program.
    err = float(jnp.abs(bf16.astype(jnp.float32) - f32).mean() / jnp.abs(f32).mean())
    assert 1e-4 < err < 0.05, err  # bf16 rounding, not the same program

    # One jitted function with the graphdef static: traced once per options, again on a flip, never stale.
    step = jax.jit(lambda g, st, i: (traces.append(1), nnx.merge(g, st).hidden(i))[1], static_argnums=0)
    for m in (model, model, bf16_model, model.with_options(scan=False), model):
        g, st = nnx.split(m)
        out = step(g, st, ids)
        assert out.dtype == (jnp.bfloat16 if m.options.compute_dtype else jnp.float32)
    assert len(traces) == 3  # f32 scanned, bf16, unrolled; the repeats reuse their programs
    jaxpr = str(jax.make_jaxpr(lambda i: model.with_options(scan=False).hidden(i))(ids))
    assert "scan[" not in jaxpr and "scan[" in str(jax.make_jaxpr(lambda i: model.hidden(i))(ids))
    # The same parameters, not a copy.
    assert model.with_options(remat="full").model.embed_tokens.weight.get_value() is \
        model.model.embed_tokens.weight.get_value()


def test_generate_compiles_per_compiler_options():
    from jaxmodels.generate import steps

    model = tiny_model("stablelm")
    default = steps.generate_program(model.options)
    assert steps.generate_program(model.with_options(scan=False).options) is default  # same compiler options
    other = model.with_options(compiler_options={})
    assert steps.generate_program(other.options) is not default
    ids = np.asarray([[5, 6, 7]], np.int32)
    before = steps.generate_program(other.options)._cache_size()
    np.testing.assert_array_equal(jaxmodels.generate(model, ids, max_new_tokens=3),
                                  jaxmodels.generate(other, ids, max_new_tokens=3))
    assert steps.generate_program(other.options)._cache_size() == before + 1  # the other options' own program


def test_init_model_and_options_carry_the_mesh():
    cfg = config_from_hf({**tiny.TINY["stablelm"], "model_type": "stablelm"})
    mesh = jaxmodels.make_mesh()
    model = jaxmodels.init_model(cfg, mesh, options={"remat": "full"}, rules={"batch": ("data",)})
    assert model.options.mesh is mesh and model.options.remat == "full"
    assert model.options.rules_table["batch"] == ("data",)


def test_inputs_built_in_one_place():
    """forward_inputs from what a user gives; prefill/decode inputs for generation; the dense mask of each."""
    ids = jnp.ones((2, 6), jnp.int32)
    am = jnp.asarray([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    plain = forward_inputs(ids)
    assert (plain.segment_ids == 1).all() and plain.mode == "train"
    np.testing.assert_array_equal(plain.dense_mask(6), causal_mask(None, 2, 6))
    padded = forward_inputs(ids, am)
    real = np.asarray(am) != 0
    np.testing.assert_array_equal(np.asarray(padded.dense_mask(6))[real], np.asarray(causal_mask(am, 2, 6))[real])
    assert not np.asarray(padded.dense_mask(6))[~real].any()  # padding queries attend nothing
    np.testing.assert_array_equal(padded.positions, np.broadcast_to(np.arange(6), (2, 6)))
    seg = jnp.asarray([[1, 1, 2, 2, 2, 0], [1, 2, 3, 3, 0, 0]])
    packed = forward_inputs(ids, segment_ids=seg)
    np.testing.assert_array_equal(packed.dense_mask(6), segment_mask(seg))
    np.testing.assert_array_equal(packed.positions, [[0, 1, 0, 1, 2, 0], [0, 0, 0, 1, 0, 1]])
    with pytest.raises(ValueError, match="not both"):
        forward_inputs(ids, am, segment_ids=seg)
    with pytest.raises(ValueError, match="positions shape"):
        forward_inputs(ids, positions=jnp.zeros((2, 5), jnp.int32))
    pre = prefill_inputs(am[:1])
    assert pre.mode == "prefill" and pre.positions.tolist() == [[1, 1, 0, 1, 2, 3]]
    # A 2-token decode step at slots 5, 6 of an 8-slot cache whose first 2 slots are prompt padding.
    kv_valid = jnp.asarray([[False, False] + [True] * 6])
    step = decode_inputs(jnp.asarray([[3, 4]]), kv_valid, 5, read_len=8)
    np.testing.assert_array_equal(step.dense_mask(8)[0], [[0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1, 0]])
    # Per-row slots (speculative decoding): row r's queries sit at index[r], index[r] + 1.
    rows = decode_inputs(jnp.zeros((2, 2), jnp.int32), jnp.ones((2, 8), bool), jnp.asarray([3, 5]))
    np.testing.assert_array_equal(rows.dense_mask(8).sum(-1), [[4, 5], [6, 7]])
