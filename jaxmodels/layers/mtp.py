"""DeepSeek-V3 multi-token prediction (MTP): the layers, their forward for training, and the loss terms.

What the MTP forward is (established from the sources below, not guessed):

* Checkpoint layout. MTP depth k (k = 1..num_nextn_predict_layers) is stored as
  `model.layers.{num_hidden_layers + k - 1}.*`: `enorm`, `hnorm` (RMSNorms of the hidden size),
  `eh_proj` (Linear 2*hidden -> hidden, no bias), a complete decoder layer (`self_attn.*`, `mlp.*`,
  `input_layernorm`, `post_attention_layernorm`; MoE when the layer index is >= first_k_dense_replace,
  which it always is in DeepSeek-V3), `shared_head.norm` (RMSNorm), `shared_head.head` [vocab, hidden] and
  `embed_tokens` [vocab, hidden].
* Concatenation order: `eh_proj(concat([enorm(emb(t_{i+k})), hnorm(h^{k-1}_i)]))` — the *embedding first*,
  the hidden state second (the name "eh" says it; vLLM `deepseek_mtp.py` DeepSeekMultiTokenPredictorLayer,
  Megatron-LM `multi_token_prediction.py` and SGLang `deepseek_nextn.py` all concatenate
  [embeds, hidden]). The paper (DeepSeek-V3 technical report, arXiv 2412.19437, §2.2, eq. 21) writes
  [RMSNorm(h); RMSNorm(Emb)], but the released weights are served with the [e; h] order above.
* Which hidden state feeds `hnorm`: for depth 1, the main model's output *after* its final norm
  (`model.norm`) — the same vector the LM head reads. vLLM and SGLang pass the target model's returned
  hidden states (their `DeepseekV2Model.forward` ends in `self.norm(...)`) and Megatron-LM's MTP block
  receives the decoder block's output after `final_layernorm`; the paper calls it "the representation
  given by the main model". For depth k > 1, the input is depth k-1's output after its own final norm
  (`shared_head.norm`), as Megatron-LM chains its MTP layers. So `Decoder.__call__` / `CausalLM.hidden`
  already return the right tensor; nothing runs twice.
* Positions: depth k at sequence index i combines h_i with the embedding of token i+k and runs its
  decoder layer with rope position = position of token i (vLLM passes the target positions unchanged
  with the input ids shifted left). Attention is causal over the same sequence, with the same padding or
  packed-document (segment) mask as the main model.
* Output: logits_k = head(shared_head.norm(out_k)); depth k at index i predicts token i + k + 1.
* Embedding and head: DeepSeek-V3 shares them with the main model (paper §2.2: "shared embedding layer"
  and "shared output head"); the checkpoint stores copies (`embed_tokens`, `shared_head.head`). vLLM keeps
  one MTP embedding and loads it from the first MTP layer; SGLang's NextN draft worker replaces its own
  embedding and head by the target model's. **jaxmodels shares**: the MTP uses `model.embed_tokens` and
  the main `lm_head` (saving 2 x vocab x hidden, 3.7 GB in bf16 for V3). Loading checks that the
  checkpoint's copies equal the main tensors (and refuses a checkpoint whose MTP head really differs);
  export writes the copies back so the layout round-trips.

Layout in jaxmodels: the MTP layers are a layer stack `model.mtp_layers` (leading `layers` axis, one entry
per depth), present when the model was built with `num_mtp_layers > 0` (from_pretrained does so when the
checkpoint holds MTP tensors).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.layers.attention import segment_mask
from jaxmodels.layers.rope import rope_tables
from jaxmodels.model import MTPLayer, causal_mask, segment_positions  # noqa: F401  (MTPLayer: the layer)

IGNORE = -100


def _layer(model, depth: int):
    stack = model.model.mtp_layers
    graphdef, state = nnx.split(stack.layers)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[depth], state))


def num_mtp_layers(model) -> int:
    stack = getattr(model.model, "mtp_layers", None)
    return 0 if stack is None else stack.num_layers


def shift_left(x: jax.Array, k: int, fill) -> jax.Array:
    """[b, s] -> [b, s] with out[:, i] = x[:, i + k], the last k entries `fill`."""
    if k == 0:
        return x
    return jnp.concatenate([x[:, k:], jnp.full_like(x[:, :k], fill)], axis=1)


def mtp_step(model, depth: int, h, tokens, cos, sin, mask, cache=None, *, absorb: bool = False, valid=None,
             segment_ids=None, compute_dtype=None):
    """One MTP depth (0-based) on h [b, s, hidden] and the *already shifted* tokens [b, s] (token i+depth+1
    at index i). cos/sin: rope tables of the positions; mask [b, s, t]. Returns (normed out, cache, stats)."""
    emb = model.model.embed_tokens(tokens, compute_dtype or h.dtype)
    layer = _layer(model, depth)
    return layer(h, emb.astype(h.dtype), cos, sin, mask, cache, absorb=absorb, valid=valid, segment_ids=segment_ids)


def mtp_hidden(model, h_main, input_ids, positions=None, attention_mask=None, segment_ids=None):
    """The k MTP depths' normed hidden states over a full sequence (training / evaluation).

    h_main [b, s, hidden]: the main model's final-normed output (`model.hidden(...)`); input_ids [b, s];
    positions [b, s] (default: as `model.hidden` builds them); attention_mask [b, s] (1 = token) or
    segment_ids [b, s] (packed rows; the MTP attention gets exactly the main model's segment mask).
    Returns a list of k arrays [b, s, hidden]; entry d at index i predicts token i + d + 2 (its logits:
    `model.logits(...)`). Indices whose shifted token runs off the row use a pad token: the loss must mask
    those targets (`mtp_loss_terms` does).
    """
    cfg = model.config
    k = num_mtp_layers(model)
    if k == 0:
        raise ValueError("this model has no MTP layers (load a DeepSeek-V3 checkpoint that has them, or build the "
                         "model with num_mtp_layers > 0)")
    input_ids = jnp.asarray(input_ids)
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
    cos, sin = rope_tables(cfg.rope, cfg.rope_head_dim, cfg.max_position_embeddings, jnp.asarray(positions))
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    outs, h = [], h_main
    for d in range(k):
        tokens = shift_left(input_ids, d + 1, pad)
        h, _, _ = mtp_step(model, d, h, tokens, cos, sin, mask, valid=valid, segment_ids=segment_ids,
                           compute_dtype=model.compute_dtype)
        outs.append(h)
    return outs


def mtp_targets(labels, depth: int, segment_ids=None):
    """Targets [b, s] of MTP depth `depth` (0-based) from *unshifted* labels [b, s] (IGNORE = not counted):
    index i predicts labels[i + depth + 2]; targets that run off the row or cross a document boundary of
    a packed row (segment_ids differ) are IGNORE."""
    n = depth + 2
    t = shift_left(jnp.asarray(labels), n, IGNORE)
    if segment_ids is not None:
        seg = jnp.asarray(segment_ids)
        t = jnp.where((shift_left(seg, n, -1) == seg) & (seg != 0), t, IGNORE)
    return t


def cross_entropy_terms(model, h, targets):
    """(summed CE float32, counted targets int32, targets ranked first int32) of the model's head over
    h [b, s, hidden] against targets [b, s] (IGNORE = not counted). Unchunked; a trainer passes its own
    chunked version (train.loss.token_cross_entropy has this signature) as `ce=`."""
    logits = model.logits(h).astype(jnp.float32)  # [b, s, vocab]
    mask = targets != IGNORE
    safe = jnp.where(mask, targets, 0)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    loss = jnp.where(mask, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0).sum()
    right = (mask & (jnp.argmax(logits, axis=-1) == safe)).sum()
    return loss, mask.sum().astype(jnp.int32), right.astype(jnp.int32)


def mtp_loss_terms(model, h_main, batch, *, ce=None):
    """Per-depth cross-entropy sums of the MTP heads, for a trainer that adds lambda x mean MTP CE.

    batch: {"input_ids" [b, s], "labels" [b, s] unshifted (IGNORE = not counted; default input_ids),
    and "segment_ids" [b, s] (packed) or "attention_mask" [b, s]; optional "positions"}. h_main: the main
    model's final-normed output for that batch (`model.hidden(...)`, the same call the LM loss uses).
    ce(model, h, targets) -> (sum, count, right): default `cross_entropy_terms`; pass
    jaxmodels.train.loss.token_cross_entropy for the chunked one (the model library does not import train).
    Returns a list (one per depth d, predicting token i + d + 2 at index i) of (summed CE float32, counted
    targets int32, targets ranked first int32); right / count is the head's top-1 accuracy: with greedy
    decoding, the draft acceptance rate.
    """
    ce = ce or cross_entropy_terms
    ids = jnp.asarray(batch["input_ids"])
    labels = jnp.asarray(batch.get("labels", ids))
    seg = batch.get("segment_ids")
    am = batch.get("attention_mask")
    if am is not None and seg is None:
        labels = jnp.where(jnp.asarray(am) != 0, labels, IGNORE)
    hs = mtp_hidden(model, h_main, ids, batch.get("positions"), None if seg is not None else am, seg)
    out = []
    for d, h in enumerate(hs):
        t = mtp_targets(labels, d, seg)
        if am is not None and seg is None:  # a padding position's hidden state predicts nothing
            t = jnp.where(jnp.asarray(am) != 0, t, IGNORE)
        out.append(ce(model, h, t))
    return out


def mtp_logits(model, h_main, input_ids, **kw):
    """Logits [b, s, vocab] of every MTP depth (a list), see `mtp_hidden`."""
    return [model.logits(h) for h in mtp_hidden(model, h_main, input_ids, **kw)]
