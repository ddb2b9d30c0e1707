"""Decoder stacks (scanned over a leading `layers` axis) and the three heads.

Parameter paths mirror transformers' names (`model.embed_tokens.weight`, `lm_head.weight`, ...), except
that layers live in stacks: DeepSeek has `model.dense_layers` (the first `first_k_dense_replace`
layers) and `model.moe_layers`; StableLM has `model.layers`. Each stack holds one layer's parameters
with a leading `layers` axis and runs with `jax.lax.scan`.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxmodels import sharding
from jaxmodels.config import BaseConfig, ConfigError, DeepseekConfig, StableLmConfig
from jaxmodels.layers.attention import (ATTENTION_IMPLS, ATTENTION_OUTPUT, ATTENTION_RESIDUALS, StableLmAttention,
                                         segment_mask)
from jaxmodels.layers.linear import Embed, Linear
from jaxmodels.layers.mla import MLAttention
from jaxmodels.layers.mlp import MLP
from jaxmodels.layers.moe import MoE
from jaxmodels.layers.norms import LayerNorm, RMSNorm
from jaxmodels.layers.rope import rope_tables


@struct.dataclass
class ModelOutput:
    """What a model call returns. logits: [batch, seq, vocab] (CausalLM), [batch, num_labels]
    (SequenceClassification) or [batch, seq, num_labels] (TokenClassification)."""

    logits: jax.Array
    hidden_states: jax.Array | None = None  # final-norm output [batch, seq, hidden]


class DeepseekLayer(nnx.Module):
    def __init__(self, cfg: DeepseekConfig, *, moe: bool, dtype, rngs: nnx.Rngs, std: float):
        self.self_attn = MLAttention(cfg, dtype=dtype, rngs=rngs, std=std)
        if moe:
            self.mlp = MoE(cfg, dtype=dtype, rngs=rngs, std=std)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, act=cfg.hidden_act,
                           bias=getattr(cfg, "mlp_bias", False), dtype=dtype, rngs=rngs, std=std)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)

    def __call__(self, x, cos, sin, mask, cache=None, absorb: bool = False, valid=None, segment_ids=None):
        """Returns (x, cache, router stats {"load", "score"} [b, experts] or None for a dense layer)."""
        x = sharding.constrain(x, sharding.ACTIVATION_AXES)  # block boundary: [batch, seq, hidden]
        h, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, absorb=absorb,
                                  segment_ids=segment_ids)
        x = x + h
        stats = None
        if isinstance(self.mlp, MoE):
            h, stats = self.mlp(self.post_attention_layernorm(x), valid)
        else:
            h = self.mlp(self.post_attention_layernorm(x))
        return x + h, cache, stats


class MTPLayer(DeepseekLayer):
    """One DeepSeek-V3 multi-token-prediction depth (jaxmodels.layers.mtp explains the forward):
    eh_proj([enorm(emb) ; hnorm(h)]) -> a decoder layer -> shared_head.norm. The embedding and the output
    head are the main model's (shared)."""

    def __init__(self, cfg: DeepseekConfig, *, dtype, rngs: nnx.Rngs, std: float):
        # MTP layers sit after the main ones (index >= num_hidden_layers): MoE whenever the model has experts.
        super().__init__(cfg, moe=cfg.is_moe and cfg.num_hidden_layers >= cfg.first_k_dense_replace, dtype=dtype,
                         rngs=rngs, std=std)
        self.enorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.hnorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size, axes=("embed", None), dtype=dtype, rngs=rngs,
                              std=std)
        self.shared_head = _SharedHeadNorm(cfg, dtype)

    def __call__(self, h, emb, cos, sin, mask, cache=None, absorb: bool = False, valid=None, segment_ids=None):
        """h [b, s, hidden]: the previous stage's normed output at index i; emb [b, s, hidden]: the embedding
        of token i + depth. Returns (normed output [b, s, hidden] — what the head and the next depth read,
        updated cache, router stats or None)."""
        with jax.named_scope("mtp_proj"):
            x = self.eh_proj(jnp.concatenate([self.enorm(emb), self.hnorm(h)], axis=-1))  # [b, s, hidden]
        x, cache, stats = super().__call__(x, cos, sin, mask, cache, absorb=absorb, valid=valid,
                                           segment_ids=segment_ids)
        return self.shared_head.norm(x), cache, stats


class _SharedHeadNorm(nnx.Module):
    """`shared_head.norm`; `shared_head.head` is the main lm_head (shared, see jaxmodels.layers.mtp)."""

    def __init__(self, cfg: DeepseekConfig, dtype):
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)


class StableLmLayer(nnx.Module):
    def __init__(self, cfg: StableLmConfig, *, dtype, rngs: nnx.Rngs, std: float):
        self.parallel = cfg.use_parallel_residual
        self.self_attn = StableLmAttention(cfg, dtype=dtype, rngs=rngs, std=std)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, act=cfg.hidden_act, dtype=dtype, rngs=rngs, std=std)
        self.input_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.post_attention_layernorm = (
            None if self.parallel else LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype))

    def __call__(self, x, cos, sin, mask, cache=None, absorb: bool = False, valid=None, segment_ids=None):
        x = sharding.constrain(x, sharding.ACTIVATION_AXES)  # block boundary: [batch, seq, hidden]
        h = self.input_layernorm(x)
        attn, cache = self.self_attn(h, cos, sin, mask, cache, segment_ids=segment_ids)
        if self.parallel:
            return x + attn + self.mlp(h), cache, None
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), cache, None


# Rematerialisation of the layer scan body (`--remat`): what the backward pass keeps from the forward.
REMAT_POLICIES = {
    "none": None,  # keep every intermediate (fastest, most memory)
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input; recompute the layer
    # keep the projections' outputs (matmuls without batch dims); recompute attention, norms, activations
    "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_all_dots": jax.checkpoint_policies.checkpoint_dots,  # also attention scores: more memory
    # keep what attention's backward kernel reads (q, k, v, output, softmax statistics) and its output; recompute
    # the norms, o_proj and the MLP. Between "full" and "save_matmuls" in memory, and unlike both it never runs
    # the attention forward kernel again (benchmarks/RESULTS.md: stablelm-3b 8x1024 compiled for an H100).
    "lean": jax.checkpoint_policies.save_only_these_names(ATTENTION_RESIDUALS, ATTENTION_OUTPUT),
}


class LayerStack(nnx.Module):
    """`num_layers` copies of one layer, parameters stacked on a leading axis, run with lax.scan."""

    def __init__(self, make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(r):
            return make_layer(r)

        self.layers = create(rngs)
        self.num_layers = num_layers
        for _, var in nnx.iter_graph(self.layers):
            if isinstance(var, nnx.Variable):
                var.set_metadata("axes", ("layers",) + tuple(var.get_metadata().get("axes", ())))

    def __call__(self, x, cos, sin, mask, cache=None, *, scan: bool = True, absorb: bool = False, valid=None,
                 remat: str = "none", segment_ids=None):
        """x [batch, seq, hidden]; cache: this stack's static cache (jaxmodels.cache, buffers with a leading
        layers axis) or None; valid [batch, seq] bool: tokens counted in router statistics. remat: a key of
        REMAT_POLICIES. Returns (x, updated cache, per-layer router stats [layers, ...] or None).

        The cache rides in the loop's carry and each layer writes only its new slots in place, so a decode
        loop never re-stacks (copies) the whole cache. Router statistics leave the scan as its outputs; with a
        cache (generation) the layers run as a while loop counted by the cache's `layer` and return none.
        """
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r} is not a policy; use one of {sorted(REMAT_POLICIES)}")
        graphdef, state = nnx.split(self.layers)

        def body(carry, xs):
            h, c = carry
            layer_state, i = xs
            layer = nnx.merge(graphdef, layer_state)
            h, c, stats = layer(h, cos, sin, mask, None if c is None else c.at_layer(i), absorb=absorb, valid=valid,
                                segment_ids=segment_ids)
            return (h, c), stats

        if remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
        if scan and cache is not None:
            # Generation (never differentiated; router statistics unused): a while loop whose only counter is
            # the cache's layer index. A scan has its own counter and slices each layer's index out of
            # `layer_ids`: one more kernel per layer on a GPU (benchmarks/count_kernels.py).
            def step(carry):
                h, c = carry
                i = c.layer
                layer_state = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), state)
                (h, c), _ = body((h, c), (layer_state, i))
                return h, c.at_layer(i + 1)

            x, cache = jax.lax.while_loop(lambda carry: carry[1].layer < self.num_layers, step,
                                          (x, cache.at_layer(0)))
            return x, cache, None
        layer_ids = jnp.arange(self.num_layers, dtype=jnp.int32)
        if scan:
            (x, cache), stats = jax.lax.scan(body, (x, cache), (state, layer_ids))
        else:
            per_layer = []
            for i in range(self.num_layers):
                (x, cache), st = body((x, cache), (jax.tree.map(lambda a: a[i], state), layer_ids[i]))
                per_layer.append(st)
            stats = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
        return x, cache, stats


class Decoder(nnx.Module):
    """Embeddings, the layer stack(s) and the final norm (transformers' `*Model`)."""

    def __init__(self, cfg: BaseConfig, *, dtype=jnp.float32, rngs: nnx.Rngs, std: float | None = None,
                 num_mtp_layers: int = 0):
        std = cfg.initializer_range if std is None else std
        self.cfg = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs, std=std)
        if isinstance(cfg, DeepseekConfig):
            def stack(n, moe):
                if n == 0:
                    return None
                return LayerStack(lambda r: DeepseekLayer(cfg, moe=moe, dtype=dtype, rngs=r, std=std), n, rngs)

            self.dense_layers = stack(cfg.num_dense_layers, False)
            self.moe_layers = stack(cfg.num_moe_layers, True)
            self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
            # DeepSeek-V3's multi-token-prediction depths (not part of `stacks()`: jaxmodels.layers.mtp runs them).
            self.mtp_layers = (LayerStack(lambda r: MTPLayer(cfg, dtype=dtype, rngs=r, std=std), num_mtp_layers, rngs)
                               if num_mtp_layers else None)
        elif isinstance(cfg, StableLmConfig):
            if num_mtp_layers:
                raise ConfigError("num_mtp_layers > 0 needs a DeepSeek model (StableLM has no MTP layers)")
            self.layers = (LayerStack(lambda r: StableLmLayer(cfg, dtype=dtype, rngs=r, std=std),
                                      cfg.num_hidden_layers, rngs) if cfg.num_hidden_layers else None)
            self.norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        else:
            raise ConfigError(f"no decoder for config type {type(cfg).__name__}")

    def stacks(self) -> dict[str, LayerStack]:
        """The non-empty layer stacks in execution order, by attribute name."""
        names = ("dense_layers", "moe_layers") if isinstance(self.cfg, DeepseekConfig) else ("layers",)
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    mesh = None  # a jax Mesh once the model is placed on one (jaxmodels.sharding.attach_mesh)
    sharding_rules = None

    @sharding.with_module_mesh
    def __call__(self, input_ids, mask, positions, cache=None, *, scan: bool = True, absorb: bool = False,
                 valid=None, remat: str = "none", compute_dtype=None, return_stats: bool = False, segment_ids=None):
        """input_ids [b, s]; mask [b, s, t] bool (True = may attend); positions [b, s] int.

        cache: dict stack name -> that stack's cache (leading layers axis), or None. valid [b, s] bool: the
        tokens that count in router statistics (None = all). compute_dtype: the activations' dtype (weights
        are cast to it where used); None = the parameters' dtype. segment_ids [b, s]: packed rows, a promise that
        mask == segment_mask(segment_ids), which lets fused attention kernels skip masked blocks.
        Returns (hidden [b, s, hidden] after the final norm, updated cache or None), plus with return_stats
        the MoE router statistics {"load", "score"}: [moe layers, b, experts] (None without MoE layers).
        """
        cfg = self.cfg
        x = sharding.constrain(self.embed_tokens(input_ids, compute_dtype), sharding.ACTIVATION_AXES)
        cos, sin = rope_tables(cfg.rope, cfg.rope_head_dim, cfg.max_position_embeddings, positions)
        cache = sharding.constrain_cache(cache)  # the table's layout: batch split, latent/heads as it says
        new_cache = {} if cache is not None else None
        router_stats = None
        for name, stack in self.stacks().items():
            with jax.named_scope(name):
                x, c, st = stack(x, cos, sin, mask, None if cache is None else cache[name], scan=scan,
                                 absorb=absorb, valid=valid, remat=remat, segment_ids=segment_ids)
            if cache is not None:
                new_cache[name] = c
            if st is not None:
                router_stats = st
        h = self.norm(x)
        return (h, new_cache, router_stats) if return_stats else (h, new_cache)


def causal_mask(attention_mask: jax.Array | None, batch: int, seq: int) -> jax.Array:
    """[b, s, s] bool: causal, and keys that are padding (attention_mask == 0) are never attended."""
    mask = jnp.tril(jnp.ones((seq, seq), dtype=bool))[None]
    if attention_mask is not None:
        mask = mask & (attention_mask[:, None, :] != 0)
    return jnp.broadcast_to(mask, (batch, seq, seq))


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """[b, s] int32: positions restarting at 0 at every document start of a packed row."""
    s = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), segment_ids.shape)
    start = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return idx - jax.lax.cummax(jnp.where(start, idx, 0), axis=1)


def attention_inputs(input_ids, attention_mask=None, positions=None, segment_ids=None):
    """(mask [b, s, s] bool, valid [b, s] bool or None, positions [b, s]) of a full forward pass: from
    segment_ids (packed rows; positions restart per document) or from attention_mask (padding; positions
    count from 0 regardless of padding, like transformers' forward)."""
    b, s = input_ids.shape
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids)
        mask, valid = segment_mask(segment_ids), segment_ids != 0
        if positions is None:
            positions = segment_positions(segment_ids)
    else:
        am = None if attention_mask is None else jnp.asarray(attention_mask)
        mask, valid = causal_mask(am, b, s), None if am is None else am != 0
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    return mask, valid, jnp.asarray(positions)


def _check_inputs(cfg: BaseConfig, input_ids, attention_mask, positions, segment_ids=None):
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integers, got {input_ids.dtype}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")
    if positions is not None and tuple(positions.shape) != tuple(input_ids.shape):
        raise ValueError(f"positions shape {tuple(positions.shape)} != input_ids shape {tuple(input_ids.shape)}")
    if segment_ids is not None and tuple(segment_ids.shape) != tuple(input_ids.shape):
        raise ValueError(f"segment_ids shape {tuple(segment_ids.shape)} != input_ids shape {tuple(input_ids.shape)}")
    if segment_ids is not None and attention_mask is not None:
        raise ValueError("pass attention_mask or segment_ids, not both: segment 0 already marks padding")


class _Headed(nnx.Module):
    head: str = ""

    def __init__(self, cfg: BaseConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None, std: float | None = None,
                 scan: bool = True, attention_impl: str = "auto", num_mtp_layers: int = 0):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.scan = scan
        # Static choices that a jitted call sees through the graph definition (changing them retraces):
        self.remat = "none"  # a key of REMAT_POLICIES, for training
        self.compute_dtype = None  # activations' dtype (None: the parameters'); e.g. bf16 over float32 weights
        self.model = Decoder(cfg, dtype=dtype, rngs=rngs, std=std, num_mtp_layers=num_mtp_layers)
        self._make_head(cfg, dtype, rngs, cfg.initializer_range if std is None else std)
        self.attention_impl = attention_impl

    @property
    def attention_impl(self) -> str:
        """Prefill/training attention kernel of every layer: "auto" (by platform and shapes), "xla",
        "cudnn", "cudnn_packed" or "splash" (jaxmodels.layers.attention). A static attribute of the
        attention blocks, so it is part of the graphdef and jit retraces when it changes."""
        return self._attention_impl

    @attention_impl.setter
    def attention_impl(self, impl: str) -> None:
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl {impl!r} is not one of {ATTENTION_IMPLS}")
        self._attention_impl = impl
        for _, node in nnx.iter_graph(self.model):
            if isinstance(node, (StableLmAttention, MLAttention)):
                node.attention_impl = impl

    def _make_head(self, cfg, dtype, rngs, std):
        raise NotImplementedError

    def hidden(self, input_ids, attention_mask=None, positions=None, segment_ids=None, *, return_stats=False):
        """Final hidden states [b, s, hidden] for a full (uncached) forward pass.

        segment_ids [b, s] (packed rows: documents 1, 2, ..., 0 = padding) replaces attention_mask: attention
        stays inside each document and positions restart per document unless given. With return_stats,
        returns (hidden, MoE router statistics or None) — see Decoder.__call__.
        """
        input_ids = jnp.asarray(input_ids)
        _check_inputs(self.config, input_ids, attention_mask, positions, segment_ids)
        segment_ids = None if segment_ids is None else jnp.asarray(segment_ids)
        mask, valid, positions = attention_inputs(input_ids, attention_mask, positions, segment_ids)
        if segment_ids is None and attention_mask is None:
            # One unpadded document per row: telling the attention kernels so lets them skip the masked blocks
            # above the diagonal (the dense mask is exactly causal here).
            segment_ids = jnp.ones(input_ids.shape, jnp.int32)
        h, _, stats = self.model(input_ids, mask, positions, scan=self.scan, valid=valid,
                                 remat=self.remat, compute_dtype=self.compute_dtype, return_stats=True,
                                 segment_ids=segment_ids)
        return (h, stats) if return_stats else h


class CausalLM(_Headed):
    """Language-model head: logits [batch, seq, vocab]; honours tie_word_embeddings."""

    head = "causal_lm"

    def _make_head(self, cfg, dtype, rngs, std):
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Linear(cfg.hidden_size, cfg.vocab_size, axes=("vocab", "embed"), dtype=dtype, rngs=rngs,
                               std=std))

    @sharding.with_module_mesh
    def logits(self, h):
        out = self.model.embed_tokens.attend(h) if self.lm_head is None else self.lm_head(h)
        return sharding.constrain(out, ("batch",) + (None,) * (out.ndim - 2) + ("act_vocab",))

    def head_output(self, h, input_ids=None):
        return self.logits(h)

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None) -> ModelOutput:
        """input_ids [b, s] int; attention_mask [b, s] (1 = token, 0 = padding); positions [b, s] optional;
        segment_ids [b, s] for packed rows instead of attention_mask (see `hidden`)."""
        h = self.hidden(input_ids, attention_mask, positions, segment_ids)
        return ModelOutput(logits=self.logits(h), hidden_states=h)


class SequenceClassification(_Headed):
    """Scores every position, then pools the rightmost non-pad token, exactly as transformers does."""

    head = "sequence_classification"

    def _make_head(self, cfg, dtype, rngs, std):
        self.score = Linear(cfg.hidden_size, cfg.num_labels, axes=(None, "embed"), dtype=dtype, rngs=rngs, std=std)

    def __call__(self, input_ids, attention_mask=None, positions=None) -> ModelOutput:
        input_ids = jnp.asarray(input_ids)
        h = self.hidden(input_ids, attention_mask, positions)
        return ModelOutput(logits=self.head_output(h, input_ids), hidden_states=h)

    def head_output(self, h, input_ids):
        """Scores [b, labels] of the rightmost non-pad token of each row (h [b, s, hidden])."""
        logits = self.score(h)  # [b, s, labels]
        b, s = input_ids.shape
        pad = self.config.pad_token_id
        if pad is None:
            if b != 1:
                raise ValueError("Cannot pool a batch of more than one sequence: the config has no pad_token_id. "
                                 "Set pad_token_id in config.json (transformers has the same rule).")
            last = jnp.full((b,), s - 1)
        else:
            # Rightmost token that is not padding; works for left and right padding.
            last = jnp.argmax(jnp.arange(s) * (input_ids != pad), axis=-1)
        return logits[jnp.arange(b), last]


class TokenClassification(_Headed):
    """Per-token labels [batch, seq, num_labels] (dropout is inactive at inference)."""

    head = "token_classification"

    def _make_head(self, cfg, dtype, rngs, std):
        self.score = Linear(cfg.hidden_size, cfg.num_labels, axes=(None, "embed"),
                            bias=cfg.token_classification_bias, dtype=dtype, rngs=rngs, std=std)

    def head_output(self, h, input_ids=None):
        return self.score(h)

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None) -> ModelOutput:
        h = self.hidden(input_ids, attention_mask, positions, segment_ids)
        return ModelOutput(logits=self.score(h), hidden_states=h)


HEADS = {c.head: c for c in (CausalLM, SequenceClassification, TokenClassification)}


def model_class(cfg: BaseConfig) -> type[_Headed]:
    head = cfg.head
    if head == "base":
        head = "causal_lm"
    return HEADS[head]


def abstract_model(cfg: BaseConfig, dtype=jnp.float32, **kw) -> _Headed:
    """The model with shapes and dtypes only (nothing allocated): for converters and planning."""
    return nnx.eval_shape(lambda: model_class(cfg)(cfg, dtype=dtype, rngs=nnx.Rngs(0), **kw))


def init_model(cfg, mesh, dtype=jnp.float32, *, rules=None, seed: int = 0, std: float | None = None,
               scan: bool = True, num_mtp_layers: int = 0):
    """A randomly initialised model created directly with its final shardings (jit with out_shardings):
    no device ever holds more than its shards. For benchmarks and training from scratch.
    num_mtp_layers: DeepSeek-V3 multi-token-prediction depths to add (jaxmodels.layers.mtp)."""
    graphdef, abstract_state = nnx.split(abstract_model(cfg, dtype, std=std, num_mtp_layers=num_mtp_layers))
    shardings = sharding.state_shardings(abstract_state, mesh, rules)

    @functools.partial(jax.jit, out_shardings=shardings)
    def create():
        return nnx.state(model_class(cfg)(cfg, dtype=dtype, rngs=nnx.Rngs(seed), std=std,
                                          num_mtp_layers=num_mtp_layers))

    model = nnx.merge(graphdef, create())
    model.scan = scan
    return sharding.attach_mesh(model, mesh, rules)
