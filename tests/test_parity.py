"""Parity with transformers (the oracle) across every supported variant of the three families.

Each case builds a tiny float32 transformers model (tests/tiny.py: std 0.15, perturbed norms and biases,
so logits are O(1)), saves it with `save_pretrained`, loads it with `jaxmodels.from_pretrained` and
compares logits at the non-pad positions: max |ours - ref| / max |ref| < 1e-4.

Checkpoints are built once per model variant and shared by the cases that only change the batch
(padding side, explicit positions), so each jitted forward compiles once per variant. The measured
error of every case is printed in a table when the module finishes (and written as markdown to
$JAXMODELS_PARITY_TABLE when that is set).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxmodels
from tiny import HEAD_CLASSES, hf_head_class, make_checkpoint, max_rel_err, random_batch

TOL = 1e-4
# Scanned and unrolled stacks run the same float32 ops in the same order per layer; only XLA fusion
# differs, so they must agree to rounding.
SCAN_TOL = 1e-6
# The forward passes are compiled with LLVM's cheap pipeline: the HLO (the model's math) is unchanged, only
# CPU code generation is less optimised, which halves compile time for these tiny models.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


# ----------------------------------------------------------------------------------------------------
# Model variants: one tiny checkpoint each.
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    family: str
    head: str = "causal_lm"
    overrides: dict = field(default_factory=dict, hash=False, compare=False)
    # Rewrite the saved config.json in the legacy form: `rope_scaling` (with `type` or `rope_type`, or null
    # for plain rope) plus top-level `rope_theta` (and `partial_rotary_factor`), no `rope_parameters`.
    legacy: str | None = None  # None, "type", "rope_type" or "null"
    batch_size: int = 2


YARN_DS = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
           "mscale": 1.0, "mscale_all_dim": 0.8, "beta_fast": 32.0, "beta_slow": 1.0}

VARIANTS: dict[str, Variant] = {
    # --- DeepSeek-V2 (3 layers: 1 dense + 2 MoE unless said otherwise) ---
    "v2-greedy": Variant("deepseek_v2", overrides=dict(topk_method="greedy")),
    "v2-group_limited_greedy": Variant("deepseek_v2", overrides=dict(topk_method="group_limited_greedy", n_group=4,
                                                                     topk_group=2)),
    "v2-q_lora_none": Variant("deepseek_v2", overrides=dict(q_lora_rank=None)),
    "v2-attention_bias": Variant("deepseek_v2", overrides=dict(attention_bias=True)),
    "v2-mlp_bias": Variant("deepseek_v2", overrides=dict(mlp_bias=True)),
    "v2-routed_scaling_2.5": Variant("deepseek_v2", overrides=dict(routed_scaling_factor=2.5)),
    "v2-n_shared_experts_0": Variant("deepseek_v2", overrides=dict(n_shared_experts=0)),
    "v2-first_k_dense_0": Variant("deepseek_v2", overrides=dict(first_k_dense_replace=0)),
    "v2-first_k_dense_all": Variant("deepseek_v2", overrides=dict(first_k_dense_replace=3)),
    "v2-tied": Variant("deepseek_v2", overrides=dict(tie_word_embeddings=True)),
    "v2-rope_linear": Variant("deepseek_v2", overrides=dict(
        rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 3.0})),
    "v2-rope_yarn": Variant("deepseek_v2", overrides=dict(rope_parameters=YARN_DS, max_position_embeddings=64)),
    "v2-rope_yarn_legacy": Variant("deepseek_v2", overrides=dict(rope_parameters=YARN_DS, max_position_embeddings=64),
                                   legacy="type"),
    "v2-seq_cls": Variant("deepseek_v2", "sequence_classification", overrides=dict(num_labels=3)),
    "v2-token_cls": Variant("deepseek_v2", "token_classification", overrides=dict(num_labels=5)),
    # --- DeepSeek-V3 (noaux_tc, n_group 4 / topk_group 2, routed_scaling_factor 2.5) ---
    "v3-noaux_tc_norm": Variant("deepseek_v3", overrides=dict(norm_topk_prob=True)),
    "v3-noaux_tc_no_norm": Variant("deepseek_v3", overrides=dict(norm_topk_prob=False)),
    "v3-rope_interleave_false": Variant("deepseek_v3", overrides=dict(rope_interleave=False)),
    "v3-q_lora_none": Variant("deepseek_v3", overrides=dict(q_lora_rank=None)),
    "v3-attention_bias": Variant("deepseek_v3", overrides=dict(attention_bias=True)),
    "v3-n_shared_experts_0": Variant("deepseek_v3", overrides=dict(n_shared_experts=0)),
    "v3-first_k_dense_0": Variant("deepseek_v3", overrides=dict(first_k_dense_replace=0)),
    "v3-first_k_dense_all": Variant("deepseek_v3", overrides=dict(first_k_dense_replace=3)),
    "v3-tied": Variant("deepseek_v3", overrides=dict(tie_word_embeddings=True)),
    "v3-rope_yarn": Variant("deepseek_v3", overrides=dict(rope_parameters=YARN_DS, max_position_embeddings=64)),
    "v3-rope_yarn_no_interleave": Variant("deepseek_v3", overrides=dict(
        rope_parameters=YARN_DS, max_position_embeddings=64, rope_interleave=False)),
    "v3-rope_dynamic": Variant("deepseek_v3", overrides=dict(
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, max_position_embeddings=16)),
    "v3-rope_llama3": Variant("deepseek_v3", overrides=dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "v3-rope_legacy": Variant("deepseek_v3", overrides=dict(
        rope_parameters={"rope_type": "linear", "rope_theta": 2000.0, "factor": 2.0}), legacy="rope_type"),
    "v3-seq_cls": Variant("deepseek_v3", "sequence_classification", overrides=dict(num_labels=3)),
    "v3-token_cls": Variant("deepseek_v3", "token_classification", overrides=dict(num_labels=5)),
    # --- StableLM (2 layers, 4 heads, head_dim 8) ---
    "stablelm-gqa_partial_0.25": Variant("stablelm", overrides=dict(num_key_value_heads=2)),
    "stablelm-partial_0.5": Variant("stablelm", overrides=dict(partial_rotary_factor=0.5)),
    "stablelm-partial_1.0": Variant("stablelm", overrides=dict(partial_rotary_factor=1.0)),
    "stablelm-mha": Variant("stablelm", overrides=dict(num_key_value_heads=4, partial_rotary_factor=0.5)),
    "stablelm-qkv_bias": Variant("stablelm", overrides=dict(use_qkv_bias=True)),
    "stablelm-qk_layernorm": Variant("stablelm", overrides=dict(qk_layernorm=True, partial_rotary_factor=0.5)),
    "stablelm-parallel_residual": Variant("stablelm", overrides=dict(use_parallel_residual=True)),
    "stablelm-all_options": Variant("stablelm", overrides=dict(
        use_qkv_bias=True, qk_layernorm=True, use_parallel_residual=True, partial_rotary_factor=0.5)),
    "stablelm-tied": Variant("stablelm", overrides=dict(tie_word_embeddings=True)),
    "stablelm-rope_linear": Variant("stablelm", overrides=dict(
        rope_parameters={"rope_type": "linear", "rope_theta": 300.0, "factor": 2.5, "partial_rotary_factor": 0.5})),
    "stablelm-rope_dynamic": Variant("stablelm", overrides=dict(
        rope_parameters={"rope_type": "dynamic", "rope_theta": 1000.0, "factor": 2.0, "partial_rotary_factor": 0.5},
        max_position_embeddings=16)),
    "stablelm-rope_yarn": Variant("stablelm", overrides=dict(rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "partial_rotary_factor": 0.5}, max_position_embeddings=64)),
    "stablelm-rope_llama3": Variant("stablelm", overrides=dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "partial_rotary_factor": 1.0})),
    "stablelm-rope_legacy": Variant("stablelm", overrides=dict(rope_parameters={
        "rope_type": "linear", "rope_theta": 700.0, "factor": 2.0, "partial_rotary_factor": 0.5}), legacy="type"),
    # The form of StableLM's hub configs: "rope_scaling": null, top-level rope_theta and partial_rotary_factor.
    "stablelm-rope_legacy_null": Variant("stablelm", overrides=dict(rope_parameters={
        "rope_type": "default", "rope_theta": 300.0, "partial_rotary_factor": 0.5}), legacy="null"),
    "stablelm-gelu": Variant("stablelm", overrides=dict(hidden_act="gelu")),
    "stablelm-seq_cls": Variant("stablelm", "sequence_classification", overrides=dict(num_labels=3)),
    # No pad_token_id: transformers (and jaxmodels) then pool the last position of a single sequence.
    "stablelm-seq_cls_no_pad_id": Variant("stablelm", "sequence_classification",
                                          overrides=dict(num_labels=3, pad_token_id=None), batch_size=1),
    "stablelm-token_cls": Variant("stablelm", "token_classification", overrides=dict(num_labels=5)),
}

# What the loaded jaxmodels model must look like for a variant to test what its name says.
STRUCTURE = {
    "v2-group_limited_greedy": lambda m: m.config.topk_method == "group_limited_greedy" and m.config.n_group == 4,
    "v2-q_lora_none": lambda m: m.model.moe_layers.layers.self_attn.q_a_proj is None,
    "v2-attention_bias": lambda m: m.model.moe_layers.layers.self_attn.o_proj.bias is not None,
    "v2-mlp_bias": lambda m: m.model.dense_layers.layers.mlp.up_proj.bias is not None,
    "v2-n_shared_experts_0": lambda m: m.model.moe_layers.layers.mlp.shared_experts.up_proj.weight.shape[1] == 0,
    "v2-first_k_dense_0": lambda m: m.model.dense_layers is None and m.model.moe_layers.num_layers == 3,
    "v2-first_k_dense_all": lambda m: m.model.moe_layers is None and m.model.dense_layers.num_layers == 3,
    "v2-tied": lambda m: m.lm_head is None,
    "v2-rope_yarn_legacy": lambda m: m.config.rope.rope_type == "yarn" and m.config.rope.mscale_all_dim == 0.8,
    "v3-noaux_tc_no_norm": lambda m: not m.config.norm_topk_prob and m.config.routed_scaling_factor == 2.5,
    "v3-rope_interleave_false": lambda m: not m.config.rope_interleave,
    "v3-first_k_dense_0": lambda m: m.model.dense_layers is None and m.model.moe_layers.num_layers == 3,
    "v3-first_k_dense_all": lambda m: m.model.moe_layers is None and m.model.dense_layers.num_layers == 3,
    "v3-tied": lambda m: m.lm_head is None,
    "v3-rope_legacy": lambda m: m.config.rope.rope_type == "linear" and m.config.rope.rope_theta == 2000.0,
    "stablelm-partial_0.5": lambda m: m.config.rotary_dim == 4,
    "stablelm-partial_1.0": lambda m: m.config.rotary_dim == 8,
    "stablelm-gqa_partial_0.25": lambda m: m.config.rotary_dim == 2 and m.config.num_key_value_heads == 2,
    "stablelm-mha": lambda m: m.config.num_key_value_heads == 4,
    "stablelm-qk_layernorm": lambda m: m.model.layers.layers.self_attn.k_layernorm.weight.shape == (2, 2, 8),
    "stablelm-parallel_residual": lambda m: m.model.layers.layers.post_attention_layernorm is None,
    "stablelm-tied": lambda m: m.lm_head is None,
    "stablelm-rope_legacy": lambda m: m.config.rope.rope_theta == 700.0 and m.config.rotary_dim == 4,
    "stablelm-rope_legacy_null": lambda m: m.config.rope.rope_theta == 300.0 and m.config.rotary_dim == 4,
    "v2-token_cls": lambda m: m.config.head == "token_classification" and m.score.weight.shape == (5, 32),
    "v3-seq_cls": lambda m: m.config.head == "sequence_classification" and m.score.weight.shape == (3, 32),
}

# (case id, variant, batch). Batches: "left" / "right" padding of row 0, "positions" (left padding plus an
# explicit `positions` argument that differs from the default arange), "long" (24 tokens, beyond the
# dynamic-rope variants' max_position_embeddings=16, so the NTK growth triggers).
CASES: list[tuple[str, str, str]] = []
for _name, _v in VARIANTS.items():
    if "dynamic" in _name:
        CASES.append((_name, _name, "long"))
    elif _v.batch_size == 1:
        CASES.append((_name, _name, "single"))
    elif _v.head == "sequence_classification":
        CASES += [(f"{_name}-left_pad", _name, "left"), (f"{_name}-right_pad", _name, "right")]
    else:
        CASES.append((_name, _name, "left"))
for _name in ("v2-greedy", "v3-noaux_tc_norm", "stablelm-gqa_partial_0.25"):
    CASES += [(f"{_name}-right_pad", _name, "right"), (f"{_name}-positions", _name, "positions")]


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------

RESULTS: dict[str, tuple[float, float]] = {}  # case id -> (max rel err, tolerance)


def _to_legacy(path: str, style: str) -> None:
    """Rewrites config.json with the pre-`rope_parameters` keys transformers still reads."""
    file = os.path.join(path, "config.json")
    with open(file) as f:
        raw = json.load(f)
    params = dict(raw.pop("rope_parameters"))
    raw["rope_theta"] = params.pop("rope_theta")
    if "partial_rotary_factor" in params:
        raw["partial_rotary_factor"] = params.pop("partial_rotary_factor")
    kind = params.pop("rope_type")
    if style == "null":
        assert kind == "default" and not params, params
        raw["rope_scaling"] = None
    else:
        raw["rope_scaling"] = {style: kind, **params}
    with open(file, "w") as f:
        json.dump(raw, f, indent=2)


class Loaded:
    """One variant: the transformers oracle, the checkpoint directory and a jitted jaxmodels forward."""

    def __init__(self, tmp_dir, name: str, v: Variant):
        self.path, self.hf = make_checkpoint(tmp_dir, v.family, v.head, **v.overrides)
        if v.legacy:
            current = jaxmodels.load_config(self.path).rope
            _to_legacy(self.path, v.legacy)
            with open(os.path.join(self.path, "config.json")) as f:
                raw = json.load(f)
            assert "rope_parameters" not in raw and "rope_scaling" in raw and "rope_theta" in raw
            # Both forms must mean the same rope to jaxmodels ...
            assert jaxmodels.load_config(self.path).rope == current
            # ... and to transformers, which is then the oracle as read from the legacy file.
            legacy_hf = HEAD_CLASSES[v.head].from_pretrained(self.path, dtype=torch.float32).eval()
            ids, mask, _ = make_batch("left", self.hf.config.vocab_size)
            assert max_rel_err(hf_forward(legacy_hf, ids, mask, None), hf_forward(self.hf, ids, mask, None)) < 1e-6
            self.hf = legacy_hf
        self.variant = v
        self.model = jaxmodels.from_pretrained(self.path, progress=False)
        self.forward = jitted_forward(self.model)


def jitted_forward(model):
    """The pure-functional path: split once, jit a function of (state, batch)."""
    graphdef, state = nnx.split(model)

    @partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(state, ids, mask, positions):
        return nnx.merge(graphdef, state)(ids, attention_mask=mask, positions=positions).logits

    def forward(ids, mask=None, positions=None):
        as_jnp = lambda x: None if x is None else jnp.asarray(x)  # noqa: E731
        return np.asarray(run(state, as_jnp(ids), as_jnp(mask), as_jnp(positions)))

    return forward


def make_batch(kind: str, vocab: int):
    """(input_ids, attention_mask, positions or None) as numpy int64."""
    if kind == "long":
        ids, mask = random_batch(vocab, seq=24, pad_left=3, seed=1)
        return ids, mask, None
    if kind == "single":
        ids, _ = random_batch(vocab, batch=1, seed=5)
        return ids, np.ones_like(ids), None
    if kind == "right":
        ids, mask = random_batch(vocab, pad_right=3, seed=2)
        return ids, mask, None
    ids, mask = random_batch(vocab, pad_left=3, seed=3)
    if kind == "positions":
        # Rope only sees position differences, so a constant shift would not test anything: count real
        # tokens only (as generation does) with random gaps of 1-3, plus a per-row offset.
        gaps = np.random.default_rng(4).integers(1, 4, size=ids.shape)
        positions = np.clip(np.cumsum(gaps * mask, axis=-1) - 1, 0, None) + np.array([[2], [5]])
        return ids, mask, positions.astype(np.int64)
    return ids, mask, None


def hf_forward(hf, ids, mask, positions):
    with torch.no_grad():
        out = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                 position_ids=None if positions is None else torch.as_tensor(positions))
    return out.logits.float().numpy()


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    cache: dict[str, Loaded] = {}

    def get(name: str) -> Loaded:
        if name not in cache:
            cache[name] = Loaded(tmp_path_factory.mktemp(name), name, VARIANTS[name])
        return cache[name]

    yield get
    cache.clear()


@pytest.fixture(scope="module", autouse=True)
def error_table(request):
    """Prints every case's measured error when the module finishes (the closing note needs them)."""
    yield
    if not RESULTS:
        return
    width = max(len(k) for k in RESULTS)
    lines = [f"| {'case':<{width}} | max rel err | tol    |", f"|{'-' * (width + 2)}|-------------|--------|"]
    lines += [f"| {k:<{width}} | {e:11.2e} | {t:.0e} |" for k, (e, t) in RESULTS.items()]
    text = "\n".join(lines)
    out = os.environ.get("JAXMODELS_PARITY_TABLE")
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print("\n\nparity with transformers, max relative error per case:\n" + text)


# ----------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case,name,batch", CASES, ids=[c[0] for c in CASES])
def test_parity(variants, case, name, batch):
    m = variants(name)
    v = m.variant
    if name in STRUCTURE:
        assert STRUCTURE[name](m.model), f"{name}: the loaded model is not the variant this case is about"
    ids, mask, positions = make_batch(batch, m.hf.config.vocab_size)
    ref = hf_forward(m.hf, ids, mask, positions)
    ours = m.forward(ids, mask, positions)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    if v.head == "sequence_classification":
        assert ref.shape == (ids.shape[0], v.overrides["num_labels"])
        assert (ours[0] != ours[-1]).any() or ids.shape[0] == 1  # rows pooled separately
        keep = None  # one pooled row per sequence, each must match
    else:
        keep = mask.astype(bool)
    err = max_rel_err(ours, ref, keep)
    RESULTS[case] = (err, TOL)
    assert np.isfinite(ours[keep] if keep is not None else ours).all()
    assert err < TOL, f"{case}: max relative error {err:.3e} >= {TOL}"


def test_batch_features_are_exercised(variants):
    """The batch kinds above would be vacuous if they did not change the oracle's logits."""
    m = variants("stablelm-gqa_partial_0.25")
    ids, mask, positions = make_batch("positions", m.hf.config.vocab_size)
    with_pos = hf_forward(m.hf, ids, mask, positions)
    without = hf_forward(m.hf, ids, mask, None)
    assert max_rel_err(with_pos, without, mask.astype(bool)) > 1e-2  # explicit positions matter
    # Padding is really there, on the side each batch says (and only pad tokens are pad_token_id).
    for kind, pads in (("left", slice(0, 3)), ("right", slice(6, 9))):
        ids, mask, _ = make_batch(kind, 96)
        assert (mask[0, pads] == 0).all() and mask[0].sum() == 6 and mask[1].all()
        assert ((ids == 0) == (mask == 0)).all()
    # Dynamic rope really grows: the long batch exceeds max_position_embeddings.
    d = VARIANTS["stablelm-rope_dynamic"]
    assert make_batch("long", 96)[0].shape[1] > d.overrides["max_position_embeddings"]


@pytest.mark.parametrize("name", ["v2-greedy", "v3-noaux_tc_norm", "stablelm-gqa_partial_0.25"])
def test_scan_equals_unrolled(variants, name):
    m = variants(name)
    unrolled = m.model.with_options(scan=False)  # the same parameters, the stacks run as a Python loop over layers
    assert m.model.options.scan
    ids, mask, _ = make_batch("left", m.hf.config.vocab_size)
    # The switch must really change the program: a scan primitive only when scanned.
    jaxpr = lambda model: str(jax.make_jaxpr(lambda i, a: model(i, attention_mask=a).logits)(  # noqa: E731
        jnp.asarray(ids), jnp.asarray(mask)))
    assert "scan[" in jaxpr(m.model) and "scan[" not in jaxpr(unrolled)
    scanned = m.forward(ids, mask)
    flat = jitted_forward(unrolled)(ids, mask)
    keep = mask.astype(bool)
    err = max_rel_err(flat, scanned, keep)
    RESULTS[f"{name}-scan_vs_unrolled"] = (err, SCAN_TOL)
    assert err < SCAN_TOL, f"scanned vs unrolled: {err:.3e}"
    # And both still match transformers.
    assert max_rel_err(flat, hf_forward(m.hf, ids, mask, None), keep) < TOL
