"""Held-out loss and bits per byte of a checkpoint (the embedded default model by default).

    python benchmarks/default_model/evaluate.py [--model DIR] [--data data/default_model/heldout.jsonl]
                                               [--baselines data/default_model/baselines.json] [--out eval.json]

Every text is encoded as <|bos|> text <|endoftext|> and cut into windows of --window tokens that overlap
by one token, so every token after <|bos|> is predicted exactly once (context restarts at each window:
a slight handicap for the model). nats = the sum of -log p(token) over those tokens, <|endoftext|>
included (it has no bytes: it only costs); bits per byte = nats / ln 2 / (UTF-8 bytes of the texts).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np


def encode_windows(tok, texts, window: int):
    """[rows, window] ids and a [rows, window] mask of the targets each row scores (1 = scored)."""
    rows, masks = [], []
    bos, eos = tok.token_id(tok.bos_token), tok.eos_token_id
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        ids = [bos] + ids + [eos]
        for s in range(0, len(ids) - 1, window - 1):
            chunk = ids[s:s + window]
            rows.append(chunk + [tok.pad_token_id] * (window - len(chunk)))
            masks.append([1] * len(chunk) + [0] * (window - len(chunk)))
    return np.asarray(rows, np.int32), np.asarray(masks, np.int32)


def heldout_metrics(model, tok, texts, *, window: int = 512, batch: int = 8) -> dict:
    """{"tokens", "bytes", "nats", "loss" (nats per token), "bits_per_byte"} of `texts` under `model`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    ids, mask = encode_windows(tok, texts, window)
    graphdef, state = nnx.split(model)

    @jax.jit
    def nll(state, ids, mask):
        logits = nnx.merge(graphdef, state)(ids, attention_mask=mask).logits.astype(jnp.float32)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # [rows, window - 1, vocab]
        tgt = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]  # [rows, window - 1]
        return -(tgt * mask[:, 1:]).sum(), mask[:, 1:].sum()

    nats, tokens = 0.0, 0
    for s in range(0, len(ids), batch):
        b_ids, b_mask = ids[s:s + batch], mask[s:s + batch]
        if len(b_ids) < batch:  # one compiled shape
            pad = batch - len(b_ids)
            b_ids = np.concatenate([b_ids, np.full((pad, window), tok.pad_token_id, np.int32)])
            b_mask = np.concatenate([b_mask, np.zeros((pad, window), np.int32)])
        n, t = jax.device_get(nll(state, b_ids, b_mask))
        nats, tokens = nats + float(n), tokens + int(t)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"tokens": tokens, "bytes": nbytes, "nats": nats, "loss": nats / tokens,
            "bits_per_byte": nats / math.log(2) / nbytes, "window": window}


def main(argv=None) -> int:
    import jax.numpy as jnp

    import jaxmodels
    from jaxmodels.tokenizer import Tokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: jaxmodels.default_model_dir())")
    p.add_argument("--data", default="data/default_model/heldout.jsonl", help='JSONL of {"text"} records')
    p.add_argument("--baselines", default="data/default_model/baselines.json")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--out", help="write the numbers here (JSON)")
    args = p.parse_args(argv)
    path = args.model or jaxmodels.default_model_dir()
    model = jaxmodels.from_pretrained(path, jnp.float32, progress=False)
    tok = Tokenizer.from_checkpoint(path)
    with open(args.data, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    out = {"model": path, "data": args.data, "files": len(texts), **heldout_metrics(model, tok, texts,
                                                                                   window=args.window)}
    try:
        with open(args.baselines) as f:
            base = json.load(f)["baselines"]
        out["gzip_9_bits_per_byte"] = base["gzip_9"]["bits_per_byte"]
        out["xz_9e_bits_per_byte"] = base["xz_9e"]["bits_per_byte"]
        assert base["bytes"] == out["bytes"], "baselines were measured on other text"
    except FileNotFoundError:
        pass
    print(json.dumps(out, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
