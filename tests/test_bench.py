"""The benchmark's arithmetic: parameter counts (the HBM roofline's bytes) against transformers' own models
of the real-size configurations, built on the meta device (no memory), and the block-wise random init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from benchmarks import bench_generate as bench


@pytest.mark.parametrize("name", list(bench.MODELS))
def test_param_counts_match_transformers(name):
    raw = dict(bench.MODELS[name])
    hf_cfg = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    counts = bench.param_counts(name)
    # state_dict: parameters plus persistent buffers (V3's e_score_correction_bias, a Buffer here too)
    assert counts["total"] == sum(t.numel() for t in hf.state_dict().values())
    if counts["experts"]:
        experts = hf.model.layers[-1].mlp.experts
        routed = sum(p.numel() for p in experts.parameters())
        assert routed == counts["experts"] * counts["expert"]


def test_decode_floor_counts_chosen_experts_and_cache():
    c = dict(total=1000, embed=100, moe_layers=2, experts=8, expert=10, k=2, cache_bytes_per_token=4)
    # batch 1: all non-expert weights but the embedding table (1000 - 2*8*10 - 100 = 740), k experts per
    # MoE layer (2 layers * 2 * 10),
    # bf16; the cache of prompt + half the new tokens.
    assert bench.decode_floor_bytes(c, 1, prompt=10, new=4) == (740 + 40) * 2 + 1 * 12 * 4
    # a large batch touches every expert
    assert bench.decode_floor_bytes(c, 10_000, prompt=10, new=4) == pytest.approx((740 + 160) * 2 + 10_000 * 12 * 4)


@pytest.mark.parametrize("shape", [(2, 6, 10, 4), (129, 7), (3, 5)])
def test_random_normal_fills_every_block(shape):
    x = np.asarray(bench.random_normal(jax.random.key(0), shape, jnp.float32, chunk_bytes=4 * 37))
    assert x.shape == shape
    assert np.all(x != 0) and len(np.unique(x)) == x.size  # every block written, no block repeated
    assert 0.01 < x.std() < 0.03


def test_profile_summary_reads_a_real_trace(tmp_path):
    """benchmarks/profile_summary.py: a jax profiler trace of a jitted function becomes per-step tables."""
    from benchmarks import profile_summary

    f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
    x = jnp.ones((256, 256))
    f(x).block_until_ready()
    text = profile_summary.profile(lambda: f(x), 3, "tanh matmul", str(tmp_path / "profile.md"))
    busy = float(text.split("device busy time per step: ")[1].split(" ms")[0])
    assert busy > 0
    assert "| category | ms/step | share |" in text and "| kernel | HLO op | calls/step |" in text
    assert (tmp_path / "profile.md").read_text().startswith("## tanh matmul")


def test_roofline_ceiling_is_the_faster_probe():
    """% roofline divides by the larger of the copy and read-only bandwidth probes (the stricter ceiling)."""
    assert bench.ceiling_gbs({"bandwidth_gbs": 2900.0, "read_bandwidth_gbs": 3500.0}) == 3500.0
    assert bench.ceiling_gbs({"bandwidth_gbs": 2900.0, "read_bandwidth_gbs": 2000.0}) == 2900.0
    assert bench.ceiling_gbs({"bandwidth_gbs": 2900.0}) == 2900.0  # results from before the read probe
