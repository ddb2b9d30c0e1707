"""The decoder (embeddings, layer stacks, final norm) and the three heads.

Parameter paths mirror transformers' names (`model.embed_tokens.weight`, `lm_head.weight`, ...), except
that layers live in stacks (jaxmodels.layers.stack): DeepSeek has `model.dense_layers` (the first
`first_k_dense_replace` layers), `model.moe_layers` and the multi-token-prediction depths `model.mtp_layers`;
StableLM has `model.layers`. Each stack holds one layer's parameters with a leading `layers` axis and runs with
`jax.lax.scan`; the decoder names its stacks and their checkpoint offsets (`Decoder.stack_layout`).

A model is built with its static `Options` (jaxmodels.options) and every forward pass is given one
`Inputs` (jaxmodels.inputs), which `hidden()` builds from what the user passes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxmodels import sharding
from jaxmodels.config import BaseConfig, ConfigError, DeepseekConfig, StableLmConfig
from jaxmodels.inputs import Inputs, forward_inputs
from jaxmodels.layers.deepseek_layer import DeepseekLayer, MTPLayer
from jaxmodels.layers.linear import Embed, Linear
from jaxmodels.layers.norms import LayerNorm, RMSNorm
from jaxmodels.layers.stablelm_layer import StableLmLayer
from jaxmodels.layers.stack import REMAT_POLICIES, LayerStack  # noqa: F401  (REMAT_POLICIES: its old home)
from jaxmodels.options import Options, as_options


@struct.dataclass
class ModelOutput:
    """What a model call returns. logits: [batch, seq, vocab] (CausalLM), [batch, num_labels]
    (SequenceClassification) or [batch, seq, num_labels] (TokenClassification)."""

    logits: jax.Array
    hidden_states: jax.Array | None = None  # final-norm output [batch, seq, hidden]


def stack_layout(cfg: BaseConfig, num_mtp_layers: int = 0) -> dict[str, tuple[int, int]]:
    """{stack attribute: (checkpoint index of its first layer, number of layers)} of a decoder, in execution
    order, the MTP depths last (`model.layers.{num_hidden_layers + d}`); empty stacks left out."""
    if isinstance(cfg, DeepseekConfig):
        out = {"dense_layers": (0, cfg.num_dense_layers), "moe_layers": (cfg.num_dense_layers, cfg.num_moe_layers),
               "mtp_layers": (cfg.num_hidden_layers, num_mtp_layers)}
    elif isinstance(cfg, StableLmConfig):
        out = {"layers": (0, cfg.num_hidden_layers)}
    else:
        raise ConfigError(f"no decoder for config type {type(cfg).__name__}")
    return {k: v for k, v in out.items() if v[1]}


class Decoder(nnx.Module):
    """Embeddings, the layer stack(s) and the final norm (transformers' `*Model`)."""

    def __init__(self, cfg: BaseConfig, *, dtype=jnp.float32, rngs: nnx.Rngs, std: float | None = None,
                 num_mtp_layers: int = 0):
        std = cfg.initializer_range if std is None else std
        self.cfg = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs, std=std)
        if isinstance(cfg, StableLmConfig) and num_mtp_layers:
            raise ConfigError("num_mtp_layers > 0 needs a DeepSeek model (StableLM has no MTP layers)")
        layout = stack_layout(cfg, num_mtp_layers)

        def stack(name, make):
            if name not in layout:
                return None
            offset, n = layout[name]
            return LayerStack(make, n, rngs, offset=offset)

        if isinstance(cfg, DeepseekConfig):
            self.dense_layers = stack("dense_layers",
                                      lambda r: DeepseekLayer(cfg, moe=False, dtype=dtype, rngs=r, std=std))
            self.moe_layers = stack("moe_layers", lambda r: DeepseekLayer(cfg, moe=True, dtype=dtype, rngs=r, std=std))
            self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
            # DeepSeek-V3's multi-token-prediction depths: not part of `stacks()`, `mtp` runs them.
            self.mtp_layers = stack("mtp_layers", lambda r: MTPLayer(cfg, dtype=dtype, rngs=r, std=std))
        else:
            self.layers = stack("layers", lambda r: StableLmLayer(cfg, dtype=dtype, rngs=r, std=std))
            self.norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)

    def stack_layout(self) -> dict[str, tuple[int, int]]:
        """{stack attribute: (checkpoint index of its first layer, number of layers)}, MTP depths included."""
        return {name: (stack.offset, stack.num_layers) for name, stack in self.all_stacks().items()}

    def all_stacks(self) -> dict[str, LayerStack]:
        """Every non-empty layer stack by attribute name: the main ones in execution order, then MTP."""
        names = ("dense_layers", "moe_layers", "mtp_layers") if isinstance(self.cfg, DeepseekConfig) else ("layers",)
        return {n: getattr(self, n) for n in names if getattr(self, n, None) is not None}

    def stacks(self) -> dict[str, LayerStack]:
        """The non-empty main layer stacks in execution order, by attribute name (MTP depths are not run here)."""
        return {n: s for n, s in self.all_stacks().items() if n != "mtp_layers"}

    def __call__(self, input_ids, inputs: Inputs, cache=None, *, return_stats: bool = False):
        """input_ids [b, s]; inputs: the forward inputs (jaxmodels.inputs; its options choose the compute dtype,
        kernels, scan, remat and mesh); cache: dict stack name -> that stack's cache (leading layers axis), or
        None. Returns (hidden [b, s, hidden] after the final norm, updated cache or None), plus with
        return_stats the MoE router statistics {"load", "score"}: [moe layers, b, experts] (None without MoE
        layers).
        """
        options = inputs.options
        inputs = inputs.with_rope(self.cfg)
        x = sharding.constrain(self.embed_tokens(input_ids, options.dtype, options), sharding.ACTIVATION_AXES, options)
        cache = sharding.constrain_cache(cache, options)  # the table's layout: batch split, latent/heads as it says
        new_cache = {} if cache is not None else None
        router_stats = None
        for name, stack in self.stacks().items():
            with jax.named_scope(name):
                x, c, st = stack(x, inputs, None if cache is None else cache[name])
            if cache is not None:
                new_cache[name] = c
            if st is not None:
                router_stats = st
        h = self.norm(x)
        return (h, new_cache, router_stats) if return_stats else (h, new_cache)

    def mtp(self, h, tokens, inputs: Inputs, cache=None, *, depth: int = 0):
        """DeepSeek-V3 multi-token-prediction depth `depth` (0-based; jaxmodels.layers.mtp) on h [b, s, hidden],
        the previous stage's normed output, and the *already shifted* tokens [b, s] (token i + depth + 1 at
        index i), with the main pass's inputs (positions, segments, cache slots, options: the same mesh and
        kernels). cache: {"mtp_layers": the MTP stack's cache} or None. Returns (normed output [b, s, hidden],
        updated cache or None, router stats or None)."""
        if getattr(self, "mtp_layers", None) is None:
            raise ValueError("this model has no MTP layers (load a DeepSeek-V3 checkpoint that has them, or build "
                             "the model with num_mtp_layers > 0)")
        options = inputs.options
        inputs = inputs.with_rope(self.cfg)
        with jax.named_scope("mtp_layers"):
            emb = self.embed_tokens(tokens, options.dtype or h.dtype, options).astype(h.dtype)  # [b, s, hidden]
            c = None
            if cache is not None:
                c = sharding.constrain_cache(cache, options)["mtp_layers"].at_layer(depth)
            h, c, stats = self.mtp_layers.layer(depth)(h, inputs, c, emb=emb)
        return h, (None if cache is None else {"mtp_layers": c}), stats


class _Headed(nnx.Module):
    head: str = ""

    def __init__(self, cfg: BaseConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None, std: float | None = None,
                 num_mtp_layers: int = 0, options: Options | dict | None = None):
        """options: the static choices of every forward pass (jaxmodels.options.Options or a dict of its fields;
        default Options()). They are part of the graph definition: see `with_options`."""
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.options = as_options(options)
        self.model = Decoder(cfg, dtype=dtype, rngs=rngs, std=std, num_mtp_layers=num_mtp_layers)
        self._make_head(cfg, dtype, rngs, cfg.initializer_range if std is None else std)

    def with_options(self, options: Options | dict | None = None, **changes) -> "_Headed":
        """This model's parameters (the same arrays, not copied) under other options: `options` replaces them
        (None: keep the current ones), then `changes` (Options fields) apply. A jitted function of
        `nnx.split(...)` of the result compiles a new program for the new options. This model is unchanged."""
        graphdef, state = nnx.split(self)
        other = nnx.merge(graphdef, state)
        other.options = as_options(self.options if options is None else options, **changes)
        return other

    def _make_head(self, cfg, dtype, rngs, std):
        raise NotImplementedError

    def inputs(self, input_ids, attention_mask=None, positions=None, segment_ids=None) -> Inputs:
        """The forward inputs (jaxmodels.inputs.Inputs) of a full pass over input_ids with this model's options."""
        return forward_inputs(input_ids, attention_mask, positions, segment_ids, options=self.options)

    def hidden(self, input_ids, attention_mask=None, positions=None, segment_ids=None, *, return_stats=False):
        """Final hidden states [b, s, hidden] for a full (uncached) forward pass.

        segment_ids [b, s] (packed rows: documents 1, 2, ..., 0 = padding) replaces attention_mask: attention
        stays inside each document and positions restart per document unless given. With return_stats,
        returns (hidden, MoE router statistics or None) — see Decoder.__call__.
        """
        input_ids = jnp.asarray(input_ids)
        inputs = self.inputs(input_ids, attention_mask, positions, segment_ids)
        h, _, stats = self.model(input_ids, inputs, return_stats=True)
        return (h, stats) if return_stats else h


class CausalLM(_Headed):
    """Language-model head: logits [batch, seq, vocab]; honours tie_word_embeddings."""

    head = "causal_lm"

    def _make_head(self, cfg, dtype, rngs, std):
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Linear(cfg.hidden_size, cfg.vocab_size, axes=("vocab", "embed"), dtype=dtype, rngs=rngs,
                               std=std))

    def logits(self, h):
        out = self.model.embed_tokens.attend(h) if self.lm_head is None else self.lm_head(h)
        return sharding.constrain(out, ("batch",) + (None,) * (out.ndim - 2) + ("act_vocab",), self.options)

    def head_weight(self):
        """The output head's [vocab, hidden] weight when the logits are exactly h @ weight.T (no LoRA adapter on
        it), for the loss's vocabulary-parallel cross-entropy (jaxmodels.layers.vocab); else None."""
        if self.lm_head is None:
            return self.model.embed_tokens.weight[...]
        return self.lm_head.weight[...] if self.lm_head.lora_a is None and self.lm_head.bias is None else None

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
               num_mtp_layers: int = 0, options: Options | dict | None = None):
    """A randomly initialised model created directly with its final shardings (jit with out_shardings):
    no device ever holds more than its shards. For benchmarks and training from scratch.
    num_mtp_layers: DeepSeek-V3 multi-token-prediction depths to add (jaxmodels.layers.mtp). options: the
    model's Options (jaxmodels.options); `mesh` and `rules` are set in them."""
    graphdef, abstract_state = nnx.split(abstract_model(cfg, dtype, std=std, num_mtp_layers=num_mtp_layers))
    shardings = sharding.state_shardings(abstract_state, mesh, rules)

    @functools.partial(jax.jit, out_shardings=shardings)
    def create():
        return nnx.state(model_class(cfg)(cfg, dtype=dtype, rngs=nnx.Rngs(seed), std=std,
                                          num_mtp_layers=num_mtp_layers))

    return nnx.merge(graphdef, create()).with_options(options, mesh=mesh, **({} if rules is None else {"rules": rules}))
