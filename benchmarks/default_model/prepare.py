"""Data and tokenizer for the embedded default model (jaxmodels/default_model/).

    python benchmarks/default_model/prepare.py --out data/default_model

Corpus: the Python sources of this interpreter's standard library (`sysconfig.get_paths()['stdlib']`),
without test suites, site-packages and files over 256 KB (generated tables). Split by file: a file is held
out when sha256(relative path) mod 50 == 0 (2%, deterministic, never trained on). Writes

  train.jsonl / heldout.jsonl   {"text": file contents, "path": relative path}, one file per record
  heldout.txt                   the held-out files concatenated (sorted by path, no separator): the text the
                                gzip -9 / xz -9e baselines and the model's bits per byte are measured on
  init/                         the from-scratch model directory for `jaxmodels train --init-from-config`:
                                config.json (a copy of benchmarks/default_model/config.json) + tokenizer.json +
                                tokenizer_config.json, a byte-level BPE (`tokenizers`) trained on the train split
                                only; <|bos|> is prepended to every encoded text
  baselines.json                gzip -9 and xz -9e bits per byte of heldout.txt, corpus statistics
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import sysconfig

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "dist-packages"}
MAX_FILE_BYTES = 256 * 1024
HELD_OUT_MOD = 50  # 1 in 50 files (2%)
SPECIAL = {"bos": "<|bos|>", "eos": "<|endoftext|>", "pad": "<|pad|>"}


def stdlib_files(root: str) -> list[str]:
    """Relative paths of the stdlib's .py files (sorted), test suites and large generated files excluded."""
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS and not x.startswith("test"))
        for f in sorted(files):
            if f.endswith(".py") and not f.startswith("test_"):
                full = os.path.join(d, f)
                if os.path.getsize(full) <= MAX_FILE_BYTES:
                    out.append(os.path.relpath(full, root))
    return sorted(out)


def held_out(rel: str) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % HELD_OUT_MOD == 0


def train_tokenizer(texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL["eos"], SPECIAL["bos"], SPECIAL["pad"]],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id(SPECIAL["bos"])
    # Every text starts with <|bos|> so its first real token is predicted too (held-out bits per byte count
    # every byte); the trainer appends <|endoftext|> itself.
    tok.post_processor = processors.TemplateProcessing(single=f"{SPECIAL['bos']} $A", special_tokens=[(SPECIAL["bos"], bos)])
    return tok


def compressed_bits_per_byte(path: str) -> dict:
    raw = os.path.getsize(path)
    out = {"bytes": raw}
    for name, cmd in (("gzip_9", ["gzip", "-9", "-c", path]), ("xz_9e", ["xz", "-9e", "-c", path])):
        size = len(subprocess.run(cmd, check=True, capture_output=True).stdout)
        out[name] = {"command": " ".join(cmd[:-1]) + " heldout.txt", "compressed_bytes": size,
                     "bits_per_byte": 8 * size / raw}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/default_model")
    p.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"])
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--config", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.json"),
                   help="the model's config.json (its vocab_size and special token ids must match the tokenizer)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    train, heldout = [], []
    for rel in stdlib_files(args.stdlib):
        try:
            with open(os.path.join(args.stdlib, rel), encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            (heldout if held_out(rel) else train).append({"text": text, "path": rel})
    for name, recs in (("train", train), ("heldout", heldout)):
        with open(os.path.join(args.out, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for r in recs:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(os.path.join(args.out, "heldout.txt"), "w", encoding="utf-8", newline="") as f:
        f.write("".join(r["text"] for r in heldout))

    tok = train_tokenizer((r["text"] for r in train), args.vocab_size)
    tdir = os.path.join(args.out, "init")
    os.makedirs(tdir, exist_ok=True)
    tok.save(os.path.join(tdir, "tokenizer.json"))
    with open(os.path.join(tdir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL["bos"],
                   "eos_token": SPECIAL["eos"], "pad_token": SPECIAL["pad"], "unk_token": None,
                   "add_bos_token": True, "model_max_length": 1024, "clean_up_tokenization_spaces": False}, f, indent=2)

    with open(args.config) as f:
        config = json.load(f)
    ids = {k: tok.token_to_id(SPECIAL[k]) for k in SPECIAL}
    if config["vocab_size"] != tok.get_vocab_size() or any(config[f"{k}_token_id"] != ids[k] for k in ids):
        raise SystemExit(f"{args.config}: vocab_size / special token ids do not match the tokenizer "
                         f"({tok.get_vocab_size()}, {ids}); fix the config")
    with open(os.path.join(tdir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)

    def stats(recs):
        nbytes = sum(len(r["text"].encode()) for r in recs)
        ntok = sum(len(e.ids) - 1 for e in tok.encode_batch([r["text"] for r in recs]))
        return {"files": len(recs), "bytes": nbytes, "tokens": ntok, "bytes_per_token": nbytes / max(ntok, 1)}

    summary = {"python": sys.version.split()[0], "stdlib": args.stdlib, "vocab_size": tok.get_vocab_size(),
               "held_out_rule": f"sha256(relative path) % {HELD_OUT_MOD} == 0",
               "train": stats(train), "heldout": stats(heldout),
               "baselines": compressed_bits_per_byte(os.path.join(args.out, "heldout.txt"))}
    with open(os.path.join(args.out, "baselines.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
