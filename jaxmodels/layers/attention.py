"""Softmax attention shared by MLA and StableLM, plus StableLM's GQA attention block.

`dot_product_attention(q, k, v, inputs, ...)` is the one entry point. It reads the mask in its structured form
from the forward inputs (`jaxmodels.inputs.Inputs`: segment ids, causal, the cache slots of a decode step)
and picks a kernel from the platform, the shapes and the model's options (`choose_implementation`, the one
place that decides):

* "xla": einsums + a float32 masked softmax over the dense mask `inputs.dense_mask` builds here. The
  reference; any platform, any mask; decode steps over a cache always run it.
* "cudnn": cuDNN flash attention (GPU, bf16/fp16), through jax's low-level cuDNN entry, which (unlike
  `jax.nn.dot_product_attention`) takes a value head dim different from the query's (MLA: 192 vs 128)
  on Hopper with cuDNN >= 9.10. The kernel is told the mask is causal, so it skips the blocks above the
  diagonal; a forward pass whose rows are each one unpadded document (checked on the device) runs plain
  causal attention, no bias; padded or packed rows add the segment mask as an additive bias, built here.
* "cudnn_packed": cuDNN's packed (THD) layout: every run of equal segment ids becomes its own causal
  sequence (q/kv offsets + lengths), no bias at all. Hopper. cuDNN sizes its work by
  the number of runs it is given, so at most `PACKED_MAX_SEGMENTS` runs per row are passed; a batch with
  a row of more runs takes the "cudnn" path instead (`lax.cond`, decided on the device). Head dims up to
  `PACKED_MAX_HEAD_DIM` only: MLA's 192 crashed the kernel (benchmarks/RESULTS.md, "Figures moved out of
  the code"); "cudnn" (the default) runs MLA with segments.
* "splash": Pallas splash attention (TPU; interpret mode elsewhere, for tests), given the `SegmentIds`.

The decode path over MLA's latent cache (`attend_absorbed`) stays on XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxmodels import sharding
from jaxmodels.config import StableLmConfig
from jaxmodels.layers.linear import Linear
from jaxmodels.layers.norms import PerHeadLayerNorm
from jaxmodels.layers.rope import apply_rope
from jaxmodels.options import ATTENTION_IMPLS

# Runs (documents + padding) per row that "cudnn_packed" passes to cuDNN: uncapped, its workspace runs out of
# memory (benchmarks/RESULTS.md, "Figures moved out of the code").
PACKED_MAX_SEGMENTS = 64
# Largest q/k head dim "cudnn_packed" accepts: the dims that matched XLA forward and backward (RESULTS.md, same).
PACKED_MAX_HEAD_DIM = 128

# Below this many queries a fused kernel buys nothing (decode steps, tiny prompts); XLA's einsums win.
_MIN_FUSED_QUERIES = 64


def masked_softmax_parts(scores: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A masked softmax over the last axis as (numerator, denominator), float32: softmax = num / den.
    scores [batch, ..., q, k]; mask [batch, q, k] (True = attend); den keeps the last axis (size 1).

    Callers take the weighted sum of the unnormalised numerator and divide it by den afterwards (flash
    attention's order): then XLA fuses the product into the sum's reduction, one kernel fewer per decode layer
    than dividing the [.., q, k] probabilities first (benchmarks/count_kernels.py). Masked logits get the dtype's
    lowest finite value (as transformers does) so a fully masked row — a left-padding query — gives a uniform
    row instead of NaNs.
    """
    scores = scores.astype(jnp.float32)
    extra = scores.ndim - mask.ndim
    mask = mask.reshape(mask.shape[:1] + (1,) * extra + mask.shape[1:])
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    num = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    return num, jnp.sum(num, axis=-1, keepdims=True)


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[b, s, s] bool from segment ids [b, s] (0 = padding): causal, and only within one document: the dense
    mask of a full forward pass (`Inputs.dense_mask`). With `segment_ids = attention_mask` (one document per
    row) it equals `causal_mask` on every non-padding query row.
    """
    s = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return same & (segment_ids[:, None, :] != 0) & jnp.tril(jnp.ones((s, s), dtype=bool))[None]


def causal_mask(attention_mask: jax.Array | None, batch: int, seq: int) -> jax.Array:
    """[b, s, s] bool: causal, and keys that are padding (attention_mask == 0) are never attended (the dense
    form of a padded batch; a reference for tests: the model builds its masks from segment ids)."""
    mask = jnp.tril(jnp.ones((seq, seq), dtype=bool))[None]
    if attention_mask is not None:
        mask = mask & (attention_mask[:, None, :] != 0)
    return jnp.broadcast_to(mask, (batch, seq, seq))


# --------------------------------------------------------------------------------------------- choice


def _cudnn_module():
    """jax's low-level cuDNN attention module, or None where this jax has none."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo
    except ImportError:  # pragma: no cover - depends on the jax build
        return None
    return fused_attention_stablehlo


@functools.cache
def _cuda_facts() -> tuple[tuple[int, int], int] | None:
    """(compute capability, cuDNN version) of the first CUDA device, or None without one."""
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        return None
    if not gpus or "cuda" not in getattr(gpus[0].client, "platform_version", "").lower():
        return None
    mod = _cudnn_module()
    try:
        version = mod.check_cudnn_version() if mod is not None else 0
    except Exception:  # cuDNN missing: no cuDNN kernels
        version = 0
    cc = tuple(int(x) for x in gpus[0].compute_capability.split("."))
    return cc, version


def _cudnn_unsupported(q, k, v, segment_ids, packed: bool) -> str | None:
    """Why cuDNN cannot run these shapes here, or None when it can."""
    facts = _cuda_facts()
    if facts is None:
        return "no CUDA GPU"
    cc, version = facts
    if version == 0 or _cudnn_module() is None:
        return "cuDNN not found"
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"cuDNN attention needs bf16/fp16 q, k, v, got {q.dtype}, {k.dtype}, {v.dtype}"
    dq, dv = q.shape[-1], v.shape[-1]
    h_max = 256 if cc >= (9, 0) else 128
    if dq % 8 or dq > h_max or dv % 8 or dv > dq:
        return f"head dims q/k {dq}, v {dv}: cuDNN needs multiples of 8, at most {h_max}, v <= q"
    if packed:
        if segment_ids is None:
            return "cudnn_packed needs segment_ids"
        if cc < (9, 0):
            return "cuDNN's packed layout needs Hopper or newer"
        if dq > PACKED_MAX_HEAD_DIM:
            return (f"cuDNN's packed layout crashed with head dim {dq} (MLA) on an H100; it takes head dims up to "
                    f"{PACKED_MAX_HEAD_DIM}. 'cudnn' runs these segments correctly")
        if k.shape[2] != q.shape[2] and jax.__version_info__ < (0, 11):
            # jax < 0.11 strides packed kv offsets by the query head count (fixed in 0.11).
            return "cuDNN's packed layout with GQA needs jax >= 0.11"
    elif q.shape[1] % 2 or k.shape[1] % 2:
        return f"cuDNN with a mask (bias) needs even sequence lengths for training, got {q.shape[1]}, {k.shape[1]}"
    return None


def _splash_unsupported(q, k, v, segment_ids) -> str | None:
    if q.shape[1] % 128 or k.shape[1] % 128:
        return f"splash attention needs sequence lengths that are multiples of 128, got {q.shape[1]}, {k.shape[1]}"
    return None


def _platform(options=None) -> str:
    """The platform the program is compiled for: the devices of the options' mesh (which may be compile-only
    TPUs or GPUs, jaxmodels.pods), else the default backend."""
    mesh = getattr(options, "mesh", None)
    if mesh is not None and hasattr(mesh, "devices"):
        return mesh.devices.flat[0].platform
    return jax.default_backend()


def choose_implementation(q: jax.Array, k: jax.Array, v: jax.Array, inputs,
                          implementation: str | None = None) -> str:
    """The attention implementation for these shapes, inputs and options on the platform the program is
    compiled for (the options' mesh's devices, else the default backend); the one place that decides.

    implementation: None takes `inputs.options.attention`; "auto" chooses; anything else is checked and
    returned (a clear error when it cannot run here). Decode steps over a cache (`inputs.mode == "decode"`)
    always run XLA: the fused kernels are prefill/training kernels over one row. Auto: cuDNN on CUDA GPUs
    (bf16/fp16, supported head dims, >= 64 queries), splash on TPU, XLA otherwise.
    """
    implementation = inputs.options.attention if implementation is None else implementation
    if implementation not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation {implementation!r} is not one of {ATTENTION_IMPLS}")
    if inputs.mode == "decode" or not inputs.causal:
        return "xla"
    segment_ids = inputs.segment_ids
    if implementation == "auto":
        if q.shape[1] < _MIN_FUSED_QUERIES:
            return "xla"
        platform = _platform(inputs.options)
        if platform == "gpu" and _cudnn_unsupported(q, k, v, segment_ids, packed=False) is None:
            return "cudnn"
        if platform == "tpu" and _splash_unsupported(q, k, v, segment_ids) is None:
            return "splash"
        return "xla"
    why = None
    if implementation in ("cudnn", "cudnn_packed"):
        why = _cudnn_unsupported(q, k, v, segment_ids, packed=implementation == "cudnn_packed")
    elif implementation == "splash":
        why = _splash_unsupported(q, k, v, segment_ids)
    if why is not None:
        raise ValueError(f"attention implementation {implementation!r} cannot run here: {why}. "
                         f"Use implementation='auto' (or 'xla').")
    return implementation


# ------------------------------------------------------------------------------------------ the entry


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, inputs, *, scale: float,
                          implementation: str | None = None) -> jax.Array:
    """softmax(q k^T * scale, masked) v with GQA.

    q [b, s, heads, dq]; k [b, t, kv_heads, dq]; v [b, t, kv_heads, dv] (kv_heads divides heads; dv may
    differ from dq, as in MLA). inputs: the forward inputs (jaxmodels.inputs.Inputs) whose segment ids,
    causal flag and cache slots say who may attend whom (`Inputs.dense_mask`). implementation: see
    `choose_implementation` (None: the inputs' options). Returns [b, s, heads, dv] in v's dtype.

    A fully masked query row (padding) gives a finite value and finite gradients, never NaN; what
    value depends on the implementation (such rows are meant to be ignored).
    """
    b, s, h, dq = q.shape
    _, t, kvh, dv = v.shape
    if k.shape[:3] != v.shape[:3] or k.shape[-1] != dq or k.shape[0] != b:
        raise ValueError(f"attention shapes disagree: q {q.shape}, k {k.shape}, v {v.shape}")
    if h % kvh:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({kvh})")
    if inputs.segment_ids.shape != (b, s):
        raise ValueError(f"segment_ids {inputs.segment_ids.shape} != (batch, queries) {(b, s)}")
    impl = choose_implementation(q, k, v, inputs, implementation)
    if impl != "xla" and s != t:
        raise ValueError(f"attention implementation {impl!r} runs self-attention over one row; got {s} queries "
                         f"and {t} keys")
    # Names for remat policies (jaxmodels.layers.stack.REMAT_POLICIES): the kernel's inputs and its output.
    q, k, v = (checkpoint_name(x, ATTENTION_INPUTS) for x in (q, k, v))
    return checkpoint_name(_attend(q, k, v, inputs, scale, impl), ATTENTION_OUTPUT)


ATTENTION_INPUTS, ATTENTION_OUTPUT, ATTENTION_RESIDUALS = "attention_inputs", "attention_output", "attention_residuals"


def _attend(q, k, v, inputs, scale, impl):
    s, t = q.shape[1], k.shape[1]
    segment_ids = inputs.segment_ids
    with jax.named_scope(f"attention_{impl}"):
        if impl == "xla":
            return _xla_attention(q, k, v, inputs.dense_mask(t), scale)
        if impl == "cudnn":
            return _cudnn_segment_attention(q, k, v, segment_ids, scale)
        if impl == "cudnn_packed":
            runs = 1 + jnp.sum(segment_ids[:, 1:] != segment_ids[:, :-1], axis=1).max()
            m = min(PACKED_MAX_SEGMENTS, s)
            return jax.lax.cond(runs <= m,
                                lambda: _cudnn_packed_attention(q, k, v, segment_ids, scale, max_segments=m),
                                lambda: _cudnn_attention(q, k, v, segment_mask(segment_ids), scale, causal=True))
        return _splash_sharded(q, k, v, segment_ids, scale, inputs.options)


# ------------------------------------------------------------------------------------------------ xla


def _xla_attention(q, k, v, mask, scale):
    b, s, h, dq = q.shape
    kvh, dv = k.shape[2], v.shape[-1]
    q = q.reshape(b, s, kvh, h // kvh, dq)  # [b, s, kv_heads, group, dq]
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k,
                        preferred_element_type=jnp.float32) * scale  # [b, kv_heads, group, s, t]
    num, den = masked_softmax_parts(scores, mask)  # [b, kv_heads, group, s, t], [b, kv_heads, group, s, 1]
    out = jnp.einsum("bkgst,btkv->bskgv", num.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = out / jnp.moveaxis(den, 3, 1)  # [b, s, kv_heads, group, dv]
    return out.astype(v.dtype).reshape(b, s, h, dv)


# ---------------------------------------------------------------------------------------------- cuDNN


def _pad_v_for_cudnn(q, v):
    """cuDNN takes dv != dq only on Hopper with cuDNN >= 9.10; elsewhere pad V with zeros up to dq."""
    dq, dv = q.shape[-1], v.shape[-1]
    cc, version = _cuda_facts()
    if dv == dq or (cc >= (9, 0) and version >= 91000):
        return v
    return jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, dq - dv)))


def _cudnn_attention(q, k, v, mask, scale, *, causal: bool):
    """Dense mask as cuDNN's additive bias [b, 1, s, t] (broadcast over heads); `causal` lets it skip blocks.
    mask None (with causal): plain causal attention, no bias to read (the bias is re-read for every head).

    A fully masked row has every logit at the same large negative bias: a uniform row, finite.
    """
    fa = _cudnn_module()
    dv = v.shape[-1]
    mask_type = fa.MaskType.CAUSAL if causal else fa.MaskType.NO_MASK
    out = fa.dot_product_attention(q, k, _pad_v_for_cudnn(q, v), mask=None if mask is None else mask[:, None],
                                   scale=scale, mask_type=mask_type, qkv_layout="BTNH")
    return out[..., :dv]


def _one_document(segment_ids: jax.Array) -> jax.Array:
    """True (a device scalar) when every row is one document with no padding: then the mask is exactly causal."""
    return jnp.all((segment_ids == segment_ids[:, :1]) & (segment_ids != 0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _cudnn_segment_attention(q, k, v, segment_ids, scale):
    """"cudnn" with segment ids. A forward pass (prefill, evaluation) checks on the device whether every row is
    one unpadded document and then runs plain causal attention without the bias (faster: RESULTS.md, "Plain
    causal cuDNN attention for one-document rows"); else the segment mask as a bias with the causal hint.
    Differentiated, it is the bias path alone (the custom VJP's forward): the choice under jax.grad would keep
    the residuals of both branches."""
    return jax.lax.cond(_one_document(segment_ids), lambda: _cudnn_attention(q, k, v, None, scale, causal=True),
                        lambda: _cudnn_attention(q, k, v, segment_mask(segment_ids), scale, causal=True))


def _cudnn_segment_attention_fwd(q, k, v, segment_ids, scale):
    mask = segment_mask(segment_ids)
    out, vjp = jax.vjp(lambda q, k, v: _cudnn_attention(q, k, v, mask, scale, causal=True), q, k, v)
    # What the backward kernel reads (q, k, v, the output, softmax statistics, the bias), named so a remat
    # policy can keep it and the backward pass does not run the forward kernel again.
    return out, jax.tree.map(lambda r: checkpoint_name(r, ATTENTION_RESIDUALS), vjp)


def _cudnn_segment_attention_bwd(scale, vjp, dout):
    return (*vjp(dout), None)  # segment ids: no gradient


_cudnn_segment_attention.defvjp(_cudnn_segment_attention_fwd, _cudnn_segment_attention_bwd)


def packed_segments(segment_ids: jax.Array, max_segments: int | None = None):
    """Runs of equal ids as cuDNN's packed layout: (offsets [b, M+1], lengths [b, M]), -1 past the last run.

    Every token lies in exactly one run, padding included (its runs are causal sequences of their own,
    so padding queries get finite values, nothing uninitialised). M defaults to seq, always enough.
    """
    b, s = segment_ids.shape
    m = s if max_segments is None else max_segments
    starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    run = jnp.cumsum(starts, axis=1) - 1  # [b, s] run index of each token

    def one_row(starts_row, run_row):
        offsets = jnp.nonzero(starts_row, size=m + 1, fill_value=-1)[0].astype(jnp.int32)
        lengths = jnp.zeros((m,), jnp.int32).at[run_row].add(1, mode="drop")
        return offsets, jnp.where(lengths > 0, lengths, -1)

    return jax.vmap(one_row)(starts, run)


def _cudnn_packed_attention(q, k, v, segment_ids, scale, max_segments: int | None = None):
    fa = _cudnn_module()
    dv = v.shape[-1]
    offsets, lengths = packed_segments(segment_ids, max_segments)
    out = fa.dot_product_attention(q, k, _pad_v_for_cudnn(q, v), q_seqlen=lengths, kv_seqlen=lengths,
                                   q_offsets=offsets, kv_offsets=offsets, scale=scale,
                                   mask_type=fa.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")
    return out[..., :dv]


# --------------------------------------------------------------------------------------------- splash


def _splash_sharded(q, k, v, segment_ids, scale, options):
    """Splash attention on the options' mesh (`Options.mesh` / `.rules`): a Pallas TPU kernel is not partitioned
    by the compiler, so it runs inside `jax.shard_map`, each device on its rows (the table's batch axes) and its
    heads (tensor), which is all attention needs (no collective). Without a mesh: one call. Interpret mode off
    TPU (the tests)."""
    mesh, rules = options.mesh, options.rules
    interpret = _platform(options) != "tpu"
    if mesh is None:
        return _splash_attention(q, k, v, segment_ids, scale, interpret=interpret)

    def spec(axes, x):
        return sharding.trim_spec(sharding.logical_to_spec(axes, rules, mesh, x.shape), mesh)

    # Heads split over tensor only when both the query and the key/value heads divide (GQA: as groups).
    q_spec, kv_spec = spec(("batch", None, "heads", None), q), spec(("batch", None, "kv_heads", None), k)
    if sharding.mesh_axes_of_spec(q_spec, 2) != sharding.mesh_axes_of_spec(kv_spec, 2):
        q_spec, kv_spec = spec(("batch", None, None, None), q), spec(("batch", None, None, None), k)
    seg_spec = sharding.trim_spec(jax.sharding.PartitionSpec(*(tuple(q_spec)[:1])), mesh)
    v_spec = kv_spec
    return jax.shard_map(functools.partial(_splash_attention, scale=scale, interpret=interpret), mesh=mesh,
                         in_specs=(q_spec, kv_spec, v_spec, seg_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v, segment_ids)


def _splash_attention(q, k, v, segment_ids, scale, *, interpret: bool):
    """Pallas splash attention, causal within segments; GQA as one MQA kernel per kv head.

    Padding (segment 0) queries attend other padding keys causally: finite, like any segment.
    Under a mesh this needs a shard_map around it (Pallas TPU kernels are not auto-partitioned).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, s, h, dq = q.shape
    t, kvh, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = h // kvh
    kernel = sk.make_splash_mqa(sm.MultiHeadMask([sm.CausalMask((s, t))] * g), head_shards=1, q_seq_shards=1,
                                interpret=interpret)
    # Splash has no scale argument; scaling q first is exact in float32 and one rounding in bf16.
    q = (q * jnp.asarray(scale, q.dtype)).reshape(b, s, kvh, g, dq).transpose(0, 2, 3, 1, 4)  # [b, kvh, g, s, dq]
    k = k.transpose(0, 2, 1, 3)  # [b, kv_heads, t, dq]
    v = v.transpose(0, 2, 1, 3)  # [b, kv_heads, t, dv]
    seg = segment_ids.astype(jnp.int32)

    def per_example(q1, k1, v1, seg1):
        ids = sk.SegmentIds(q=seg1, kv=seg1)
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids))(q1, k1, v1)

    out = jax.vmap(per_example)(q, k, v, seg)  # [b, kv_heads, group, s, dv]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, s, h, dv)


# ------------------------------------------------------------------------------------------- StableLM


class StableLmAttention(nnx.Module):
    """Multi-head attention with GQA, optional qkv bias, per-head q/k LayerNorm and partial rotary."""

    def __init__(self, cfg: StableLmConfig, *, dtype, rngs: nnx.Rngs, std: float):
        self.cfg = cfg
        h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        hid = cfg.hidden_size
        kw = dict(dtype=dtype, rngs=rngs, std=std)
        self.q_proj = Linear(hid, h * d, axes=("heads", "embed"), bias=cfg.use_qkv_bias, **kw)
        self.k_proj = Linear(hid, kvh * d, axes=("kv_heads", "embed"), bias=cfg.use_qkv_bias, **kw)
        self.v_proj = Linear(hid, kvh * d, axes=("kv_heads", "embed"), bias=cfg.use_qkv_bias, **kw)
        self.o_proj = Linear(h * d, hid, axes=("embed", "heads"), bias=False, **kw)
        if cfg.qk_layernorm:
            self.q_layernorm = PerHeadLayerNorm(h, d, eps=cfg.layer_norm_eps, dtype=dtype, heads_axis="heads")
            self.k_layernorm = PerHeadLayerNorm(kvh, d, eps=cfg.layer_norm_eps, dtype=dtype, heads_axis="kv_heads")
        else:
            self.q_layernorm = self.k_layernorm = None

    def project_qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
        """Rotated q [b, s, heads, d], k and v [b, s, kv_heads, d]."""
        cfg = self.cfg
        b, s, _ = x.shape
        d, r = cfg.head_dim, cfg.rotary_dim
        q = self.q_proj(x).reshape(b, s, cfg.num_attention_heads, d)
        k = self.k_proj(x).reshape(b, s, cfg.num_key_value_heads, d)
        v = self.v_proj(x).reshape(b, s, cfg.num_key_value_heads, d)
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        # Rotary on the first `rotary_dim` of each head only (partial_rotary_factor).
        q = jnp.concatenate([apply_rope(q[..., :r], cos, sin, interleaved=False), q[..., r:]], axis=-1)
        k = jnp.concatenate([apply_rope(k[..., :r], cos, sin, interleaved=False), k[..., r:]], axis=-1)
        return q, k, v

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, inputs) -> jax.Array:
        """q [b, s, heads, d]; k, v [b, t, kv_heads, d] -> [b, s, hidden]."""
        b, s, h, d = q.shape
        out = dot_product_attention(q, k, v, inputs, scale=d ** -0.5)  # [b, s, heads, d]
        return self.o_proj(out.reshape(b, s, h * d))

    def __call__(self, x, cos, sin, inputs, cache=None):
        """x [b, s, hidden]; cos, sin: rope tables of inputs.positions; inputs: jaxmodels.inputs.Inputs;
        cache: this layer's view of the stack's cache or None. Returns ([b, s, hidden], cache)."""
        with jax.named_scope("stablelm_attention"):
            q, k, v = self.project_qkv(x, cos, sin)
            if cache is not None:
                k, v, cache = cache.update(k, v, inputs)
            return self.attend(q, k, v, inputs), cache
