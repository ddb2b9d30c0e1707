"""TPU programs compiled on this (CPU) machine for a TPU topology through libtpu (jaxmodels.pods), and the
splash-attention path inside shard_map run in Pallas interpret mode on CPU.

The compile tests skip cleanly when libtpu is not installed (`pip install "jaxmodels[tpu-plan]"`).
"""

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels import pods, sharding
from jaxmodels.config import config_from_hf
from jaxmodels.inputs import forward_inputs
from jaxmodels.layers.attention import dot_product_attention
from jaxmodels.options import Options

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install 'jaxmodels[tpu-plan]')")

# Small, with the TPU kernels' real tile sizes: MLA's 192/128 head dims, 128-wide experts, sequences of 256.
SMALL_V3 = dict(model_type="deepseek_v3", vocab_size=512, hidden_size=256, intermediate_size=512,
                moe_intermediate_size=128, num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2,
                n_routed_experts=8, n_shared_experts=1, n_group=2, topk_group=1, num_experts_per_tok=2,
                kv_lora_rank=128, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                max_position_embeddings=4096)
SMALL_STABLELM = dict(model_type="stablelm", vocab_size=512, hidden_size=512, intermediate_size=1024,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)


def test_topology_names():
    """Slices by Google Cloud's names: v4/v5p-N count TensorCores (2 per chip), v5e/v6e-N count chips."""
    assert pods.slice_shape(4, 3) == (2, 2, 1)
    assert pods.slice_shape(64, 3) == (4, 4, 4)
    assert pods.slice_shape(128, 3) == (4, 4, 8)
    assert pods.slice_shape(256, 3) == (4, 8, 8)
    assert pods.slice_shape(8, 2) == (2, 4)
    assert pods.slice_shape(256, 2) == (16, 16)
    with pytest.raises(pods.TopologyError, match="powers of two"):
        pods.slice_shape(12, 3)
    with pytest.raises(pods.TopologyError, match="not a topology"):
        pods.parse_topology("tpu-9000")
    assert pods.default_mesh(config_from_hf(dict(SMALL_V3)), 16) == {"data": 1, "fsdp": 2, "expert": 8, "tensor": 1}


@needs_libtpu
def test_tpu_topologies_have_one_device_per_chip():
    for name, chips, kind in (("v5p-8", 4, "TPU v5"), ("v5p-256", 128, "TPU v5"), ("v5e-8", 8, "TPU v5 lite"),
                              ("v6e:2x4", 8, "TPU v6 lite")):
        topo = pods.parse_topology(name)
        assert topo.platform == "tpu" and topo.chips == chips and topo.devices[0].device_kind == kind, name


def test_splash_inside_shard_map_matches_xla():
    """The mesh path of splash (shard_map over the batch / heads axes) in interpret mode, forward and gradients,
    against XLA attention, with MLA's unequal head dims and GQA."""
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    b, s, h, kvh, dq, dv = 2, 256, 4, 2, 48, 32
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (b, s, h, dq))
    k = jax.random.normal(ks[1], (b, s, kvh, dq))
    v = jax.random.normal(ks[2], (b, s, kvh, dv))
    seg = jnp.concatenate([jnp.ones((b, 100), jnp.int32), 2 * jnp.ones((b, 156), jnp.int32)], axis=1)
    w = jax.random.normal(ks[3], (b, s, h, dv))

    inputs = forward_inputs(jnp.zeros((b, s), jnp.int32), segment_ids=seg, options=Options(mesh=mesh))

    def loss(impl, q, k, v):
        out = dot_product_attention(q, k, v, inputs, scale=dq ** -0.5, implementation=impl)
        return jnp.sum(out * w), out

    (_, ox), gx = jax.value_and_grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    (_, os_), gs = jax.value_and_grad(lambda *a: loss("splash", *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    np.testing.assert_allclose(os_, ox, rtol=2e-4, atol=2e-4)
    for a, b_ in zip(gs, gx):
        np.testing.assert_allclose(a, b_, rtol=2e-4, atol=2e-4)


@needs_libtpu
@pytest.mark.slow
def test_plan_compiles_the_train_step_for_a_tpu_slice(tmp_path, capsys):
    """`jaxmodels plan --compile` on a v5p-8 (4 chips, fsdp=2 x expert=2): the trainer's step compiles with
    splash attention (forward and both backward kernels) and XLA's TPU ragged-dot for the experts, and the
    report has the compiled memory, collectives, the step-time estimate and a verdict."""
    from jaxmodels.cli import main

    (tmp_path / "config.json").write_text(json.dumps(SMALL_V3))
    code = main(["plan", "--model", str(tmp_path), "--topology", "v5p-8", "--mesh", "fsdp=2,expert=2", "--train",
                 "--batch", "4", "--seq", "256", "--compile"])
    out = capsys.readouterr().out
    assert code == 0, out
    for kernel in ("tpu:splash_mqa_fwd_segmented_residuals", "tpu:splash_mqa_dq_segmented_no_residuals",
                   "tpu:splash_mqa_dkv_segmented_no_residuals", "tpu:ragged-dot-none"):
        assert kernel in out, (kernel, out)
    assert "all-gather x" in out and "verdict      fits" in out and "MFU" in out and "ESTIMATE" in out
    assert "2 chips" not in out and "TPU v5p 2x2x1: 4 chips" in out


@needs_libtpu
@pytest.mark.slow
def test_generate_programs_compile_for_tpu():
    """Generate's prefill (splash over the prompt's segments) and decode step (XLA attention over the latent
    cache: no splash) for a v5p-8; the decode step writes the donated cache in place."""
    topo = pods.parse_topology("v5p-8")
    mesh = pods.make_mesh(topo, {"fsdp": 4})
    progs = pods.generate_programs(config_from_hf(dict(SMALL_V3)), mesh, batch=4, prompt=256, cache_len=512)
    prefill = pods.compile_program(*progs["prefill"])
    decode = pods.compile_program(*progs["decode"])
    assert not prefill.error and not decode.error
    assert any(k.startswith("tpu:splash_mqa_fwd") for k in pods.kernels(prefill.hlo))
    assert not any("splash" in k for k in pods.kernels(decode.hlo))
    cache_bytes = 2 * 4 * 512 * (128 + 64) * 2 // 4  # 2 layers x [batch, slots, lora + rope] bf16 over 4 chips
    assert decode.aliased >= cache_bytes


@needs_libtpu
@pytest.mark.slow
def test_stablelm_gqa_train_step_compiles_with_splash():
    topo = pods.parse_topology("v5e-8")
    mesh = pods.make_mesh(topo, {"fsdp": 4, "tensor": 2})
    step, args = pods.train_program(config_from_hf(dict(SMALL_STABLELM)), mesh, pods.TrainSetup(batch=4, seq=256))
    c = pods.compile_program(step, args)
    assert not c.error, c.error
    ks = pods.kernels(c.hlo)
    assert any(k.startswith("tpu:splash_mqa_fwd") for k in ks) and any("dkv" in k for k in ks), ks
    # AdamW's moments are placed like the parameters: the arguments are params + 2 moments, split 8 ways
    # (a replicated moment would make them several times larger).
    n = sum(np.prod(x.shape) for x in jax.tree.leaves(args[0]["params"]))
    assert c.arguments < 3 * 4 * n / 8 * 1.5


@needs_libtpu
@pytest.mark.slow
def test_no_chip_holds_the_whole_vocabulary_table():
    """The embedding lookup and the vocabulary-parallel loss (jaxmodels.layers.vocab) on a v5e-8 under FSDP: no
    chip holds the whole [vocab, hidden] table or head in any dtype, in either pass (XLA's own lookup and
    logits gather them whole there)."""
    hf = dict(SMALL_STABLELM, vocab_size=1536)  # a [vocab, hidden] shape no other array has
    mesh = pods.make_mesh(pods.parse_topology("v5e-8"), {"fsdp": 8})
    c = pods.compile_program(*pods.train_program(config_from_hf(hf), mesh, pods.TrainSetup(batch=8, seq=256)))
    assert not c.error, c.error
    assert f"[{hf['vocab_size']},{hf['hidden_size']}]" not in c.hlo


@needs_libtpu
@pytest.mark.slow
def test_plan_search_compiles_candidates_and_picks_the_fastest_that_fits(tmp_path, capsys):
    """`jaxmodels plan --compile --search` on a v5p-8: the planner rules candidates out, the shortlist is compiled,
    the fitting ones get XLA's full-depth step-time estimate, and the best is reported with its verdict."""
    from jaxmodels.cli import main

    (tmp_path / "config.json").write_text(json.dumps(SMALL_V3))
    code = main(["plan", "--model", str(tmp_path), "--topology", "v5p-8", "--train", "--batch", "4", "--seq", "256",
                 "--compile", "--search", "--search-limit", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "compiling 2 (--search-limit 2)" in out and out.count("): estimated step") == 2, out
    assert "best of 2 compiled candidates" in out and "verdict      fits" in out and "MFU" in out, out
