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
checkpoint holds MTP tensors). The layer is `jaxmodels.layers.deepseek_layer.MTPLayer`; one depth's forward
is the decoder's (`Decoder.mtp`), given the same `Inputs` as the main pass, so it runs with the model's options
and on its mesh like every layer (its MoE expert-parallel). The MTP loss is the trainer's
(`jaxmodels.train.loss.mtp_loss_terms`, with the one cross-entropy).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def num_mtp_layers(model) -> int:
    stack = getattr(model.model, "mtp_layers", None)
    return 0 if stack is None else stack.num_layers


def shift_left(x: jax.Array, k: int, fill) -> jax.Array:
    """[b, s] -> [b, s] with out[:, i] = x[:, i + k], the last k entries `fill`."""
    if k == 0:
        return x
    return jnp.concatenate([x[:, k:], jnp.full_like(x[:, :k], fill)], axis=1)


def mtp_hidden(model, h_main, input_ids, positions=None, attention_mask=None, segment_ids=None):
    """The k MTP depths' normed hidden states over a full sequence (training / evaluation).

    h_main [b, s, hidden]: the main model's final-normed output (`model.hidden(...)`); input_ids [b, s];
    positions [b, s] (default: as `model.hidden` builds them); attention_mask [b, s] (1 = token) or
    segment_ids [b, s] (packed rows; the MTP attention gets exactly the main model's segment mask).
    Returns a list of k arrays [b, s, hidden]; entry d at index i predicts token i + d + 2 (its logits:
    `model.logits(...)`). Indices whose shifted token runs off the row use a pad token: the loss must mask
    those targets (`jaxmodels.train.loss.mtp_loss_terms` does).
    """
    cfg = model.config
    k = num_mtp_layers(model)
    if k == 0:
        raise ValueError("this model has no MTP layers (load a DeepSeek-V3 checkpoint that has them, or build the "
                         "model with num_mtp_layers > 0)")
    input_ids = jnp.asarray(input_ids)
    inputs = model.inputs(input_ids, attention_mask, positions, segment_ids)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    outs, h = [], h_main
    for d in range(k):
        h, _, _ = model.model.mtp(h, shift_left(input_ids, d + 1, pad), inputs, depth=d)
        outs.append(h)
    return outs


def mtp_logits(model, h_main, input_ids, **kw):
    """Logits [b, s, vocab] of every MTP depth (a list), see `mtp_hidden`."""
    return [model.logits(h) for h in mtp_hidden(model, h_main, input_ids, **kw)]
