"""The fine-tuning data pipeline: JSONL records -> tokenised documents -> packed rows -> Grain batches.

Record kinds (one JSON object per line; see `load_records`):

  {"text": ...}                            causal LM, every token a target
  {"prompt": ..., "completion": ...}       causal LM, targets on the completion only
  {"messages": [{"role", "content"}, ...]} causal LM through the chat template, targets on assistant turns
  {"text": ..., "label": int}              sequence classification
  {"text": ..., "labels": [int, ...]}      token classification (one label per token of `text`)

LM rows are packed: documents are concatenated into rows of `seq_len` with `segment_ids` (1, 2, ... per
document, 0 = padding) and `positions` restarting at 0 in each document, so attention can be masked
across documents. `labels` are unshifted (transformers convention: `labels[t]` is the token at t or -100,
the loss shifts) and the first token of every document is -100, so a shifted loss never asks a document
to predict the next one's first token. Classification rows are one right-padded sequence each.

Why Grain: tokenising and packing happen once, up front, into numpy arrays; what remains is a shuffle
and a batch over row indices. Grain's `MapDataset` is random access: `ds[i]` is a pure function of
(rows, seed, i), with per-epoch reshuffling built into its shuffle (epoch = i // batches_per_epoch,
shuffle seed = seed + epoch). So the loader has no hidden iterator state to save: the trainer's
checkpointed "data position" is the next batch index, and resuming is `batch(index)` from there.
`TrainData.fingerprint` lets the trainer refuse to resume on different data, tokenizer or seq_len.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from jaxmodels.tokenizer import Tokenizer, TokenizerError
from jaxmodels.train.loss import IGNORE  # label of a position the loss skips (transformers' ignore_index)

TASKS = ("causal_lm", "sequence_classification", "token_classification")  # the model heads' names

# Record kind -> the task it trains. LM kinds may share a file; classification kinds may not mix with them.
KIND_TASK = {
    "text": "causal_lm",
    "completion": "causal_lm",
    "messages": "causal_lm",
    "label": "sequence_classification",
    "labels": "token_classification",
}
KNOWN_FIELDS = ('{"text"}', '{"prompt", "completion"}', '{"messages"}', '{"text", "label"}', '{"text", "labels"}')


class DataError(ValueError):
    """Training data the pipeline cannot use; the message names the file/line, the cause and the fix."""


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------

def load_records(path: str) -> list[dict]:
    """Reads a JSONL file: one JSON object per line, blank lines skipped.

    Returns the records in file order. Raises DataError for a missing file, malformed JSON (naming the
    line), a record that is not an object or has no known fields, a record whose fields have the wrong
    types, or a file mixing classification records with other kinds.
    """
    return [rec for _, rec, _ in _read(path)]


def _read(path: str) -> list[tuple[int, dict, str]]:
    """(line number, record, kind) for every non-blank line, validated."""
    if not os.path.isfile(path):
        raise DataError(f"training data file {path!r} does not exist; pass the path of a JSONL file "
                        "(one JSON object per line)")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno}); each line must "
                                "be one complete JSON object") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path} line {n}: expected a JSON object, got {type(rec).__name__}; write each "
                                "record as {...} on its own line")
            out.append((n, rec, _kind(rec, path, n)))
    if not out:
        raise DataError(f"{path} has no records; it is empty or only blank lines")
    tasks = {KIND_TASK[k] for _, _, k in out}
    if len(tasks) > 1:
        first = {}
        for n, _, k in out:
            first.setdefault(KIND_TASK[k], (n, k))
        where = ", ".join(f"{t} (line {n}, {k!r} record)" for t, (n, k) in first.items())
        raise DataError(f"{path} mixes records for different tasks: {where}. Text, prompt/completion and messages "
                        "records may share a file; classification records need a file of their own")
    return out


def _kind(rec: dict, path: str, n: int) -> str:
    """Which record kind this is, with its fields' types checked."""
    where = f"{path} line {n}"

    def need(key, types, what):
        if not isinstance(rec[key], types) or isinstance(rec[key], bool):
            raise DataError(f"{where}: {key!r} must be {what}, got {type(rec[key]).__name__}")

    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role': ..., 'content': ...}}")
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: message {i} must be an object with string 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: no 'assistant' message, so nothing to learn; add the assistant's reply")
        return "messages"
    if "prompt" in rec or "completion" in rec:
        if not ("prompt" in rec and "completion" in rec):
            raise DataError(f"{where}: a prompt/completion record needs both 'prompt' and 'completion'")
        need("prompt", str, "a string")
        need("completion", str, "a string")
        return "completion"
    if "text" in rec:
        need("text", str, "a string")
        if "label" in rec:
            need("label", int, "an integer class id")
            return "label"
        if "labels" in rec:
            labels = rec["labels"]
            if not isinstance(labels, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in labels):
                raise DataError(f"{where}: 'labels' must be a list of integer class ids (-100 to skip a token)")
            return "labels"
        return "text"
    raise DataError(f"{where}: none of the known fields (found {sorted(rec)}); a record has one of the field sets "
                    f"{', '.join(KNOWN_FIELDS)}")


# ----------------------------------------------------------------------------------------------------
# Tokenising: each record -> (ids, labels) with labels unshifted and -100 where there is no target
# ----------------------------------------------------------------------------------------------------

def _append_eos(ids: list[int], labels: list[int], special: list[int], eos: int | None) -> None:
    """Ends an LM document with EOS as a target, so the model learns to stop."""
    if eos is None:
        return
    if ids and ids[-1] == eos and special[-1]:  # the post-processor already appended it
        labels[-1] = eos
        return
    ids.append(eos)
    labels.append(eos)


def _encode_text(tok: Tokenizer, text: str) -> tuple[list[int], list[int]]:
    enc = tok.tok.encode(text, add_special_tokens=True)
    ids, labels = list(enc.ids), list(enc.ids)
    _append_eos(ids, labels, list(enc.special_tokens_mask), tok.eos_token_id)
    return ids, labels


def _encode_spans(tok: Tokenizer, text: str, spans: Sequence[tuple[int, int]], add_special_tokens: bool):
    """Encodes `text` as one string; a token is a target iff its span starts inside one of `spans`.

    Tokenising the whole text (rather than prompt and completion apart) gives the ids the model sees at
    inference; a token merged across a boundary starts before it and so belongs to the prompt side.
    """
    enc = tok.tok.encode(text, add_special_tokens=add_special_tokens)
    ids = np.asarray(enc.ids, np.int64)
    start = np.asarray([o[0] for o in enc.offsets], np.int64).reshape(-1)
    target = np.zeros(len(ids), bool)
    for s, e in spans:
        target |= (start >= s) & (start < e)
    target &= np.asarray(enc.special_tokens_mask, bool) == 0  # post-processor tokens (BOS) sit at (0, 0)
    return ids.tolist(), np.where(target, ids, IGNORE).tolist(), enc


def _encode_completion(tok: Tokenizer, prompt: str, completion: str):
    text = prompt + completion
    ids, labels, enc = _encode_spans(tok, text, [(len(prompt), len(text))], add_special_tokens=True)
    _append_eos(ids, labels, list(enc.special_tokens_mask), tok.eos_token_id)
    return ids, labels


def _encode_messages(tok: Tokenizer, messages: list[dict], where: str):
    """Renders the chat template; targets are the characters each assistant turn adds to the rendering."""
    if not tok.chat_template:
        raise DataError(f"{where}: 'messages' records need a chat template, and this checkpoint's "
                        "tokenizer_config.json (or chat_template.jinja) has none; add one, or write the data as "
                        "prompt/completion records")
    try:
        full = tok.render_chat(messages, add_generation_prompt=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = tok.render_chat(messages[:i], add_generation_prompt=True)
            upto = tok.render_chat(messages[:i + 1], add_generation_prompt=False)
            if not (full.startswith(before) and full.startswith(upto) and len(before) <= len(upto)):
                raise DataError(f"{where}: the chat template is not prefix-stable (rendering the first {i} "
                                "messages is not a prefix of rendering them all), so assistant turns cannot be "
                                "located; use prompt/completion records, or a template that renders each "
                                "message independently of later ones")
            spans.append((len(before), len(upto)))
    except TokenizerError as e:
        raise DataError(f"{where}: {e}") from None
    # The template writes BOS/EOS itself (transformers encodes chat with add_special_tokens=False).
    ids, labels, _ = _encode_spans(tok, full, spans, add_special_tokens=False)
    return ids, labels


def _encode_token_labels(tok: Tokenizer, text: str, token_labels: list[int], where: str):
    """Token classification: one label per token of `text`; added special tokens (BOS) get -100."""
    enc = tok.tok.encode(text, add_special_tokens=True)
    n_text = len(enc.ids) - sum(enc.special_tokens_mask)
    if n_text != len(token_labels):
        raise DataError(f"{where}: {len(token_labels)} labels for {n_text} tokens; the tokenizer splits the text "
                        f"into {n_text} tokens ({enc.tokens[:8]}...), give exactly one label per token "
                        "(-100 to skip one)")
    it = iter(token_labels)
    labels = [IGNORE if s else next(it) for s in enc.special_tokens_mask]
    return list(enc.ids), labels


# ----------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------

@dataclass
class PackStats:
    """What packing did. efficiency: fraction of row tokens that are not padding."""
    documents: int = 0
    rows: int = 0
    tokens: int = 0
    split_documents: int = 0      # longer than seq_len, cut into chunks
    dropped_chunks: int = 0       # chunks with no targets (e.g. a prompt longer than seq_len)
    truncated: int = 0            # classification sequences cut to seq_len
    efficiency: float = 0.0


def pack(docs: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int, pad_id: int,
         stats: PackStats | None = None) -> dict[str, np.ndarray]:
    """Packs LM documents (ids, labels) into rows of `seq_len`, in the given order, deterministically.

    Returns {"input_ids", "labels", "segment_ids", "positions"}, each [rows, seq_len] int32. Segments
    count 1, 2, ... within a row (0 = padding); positions restart at 0 per segment; the first label of
    every segment is -100; padding is (pad_id, -100, 0, 0).

    A document longer than seq_len is cut into seq_len chunks, each its own segment with positions from
    0: a chunk is then an independent training sequence that fits the model's context, and no row needs
    context from another row (rows are shuffled). Continuing positions would claim context the chunk
    cannot attend to. Chunks with no target at all are dropped: they cost compute and teach nothing.

    Placement is best-fit (the open row with the least room that still fits), found by bisection in
    O(log rows) per chunk: greedy like first-fit, as dense, and fast on large files.
    """
    stats = stats if stats is not None else PackStats()
    chunks = []
    for ids, labels in docs:
        if len(ids) == 0:
            continue
        stats.documents += 1
        if len(ids) > seq_len:
            stats.split_documents += 1
        for s in range(0, len(ids), seq_len):
            c_ids, c_labels = list(ids[s:s + seq_len]), list(labels[s:s + seq_len])
            c_labels[0] = IGNORE  # its predecessor is in another segment (or row): nothing predicts it
            if all(x == IGNORE for x in c_labels):
                stats.dropped_chunks += 1
                continue
            chunks.append((c_ids, c_labels))

    rows: list[list[tuple[list[int], list[int]]]] = []
    room: list[tuple[int, int]] = []  # sorted (free tokens, row index) of rows that are not full
    for c in chunks:
        n = len(c[0])
        k = bisect.bisect_left(room, (n, -1))
        if k < len(room):
            free, r = room.pop(k)
        else:
            free, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(c)
        if free - n > 0:
            bisect.insort(room, (free - n, r))

    out = {k: np.zeros((len(rows), seq_len), np.int32) for k in ("input_ids", "labels", "segment_ids", "positions")}
    out["input_ids"][:] = pad_id
    out["labels"][:] = IGNORE
    for r, row in enumerate(rows):
        t = 0
        for seg, (ids, labels) in enumerate(row, start=1):
            n = len(ids)
            out["input_ids"][r, t:t + n] = ids
            out["labels"][r, t:t + n] = labels
            out["segment_ids"][r, t:t + n] = seg
            out["positions"][r, t:t + n] = np.arange(n)
            t += n
    stats.rows = len(rows)
    stats.tokens = int((out["segment_ids"] > 0).sum())
    stats.efficiency = stats.tokens / max(1, out["segment_ids"].size)
    return out


def pad_rows(seqs: Sequence[tuple[Sequence[int], Any]], seq_len: int, pad_id: int, per_token: bool,
             stats: PackStats | None = None) -> dict[str, np.ndarray]:
    """Classification rows: one sequence each, right-padded (or truncated) to seq_len.

    Returns {"input_ids" [N, L], "attention_mask" [N, L], "labels" [N] (per_token=False) or [N, L]
    (per_token=True, -100 at padding)}, int32.
    """
    stats = stats if stats is not None else PackStats()
    n = len(seqs)
    out = {"input_ids": np.full((n, seq_len), pad_id, np.int32), "attention_mask": np.zeros((n, seq_len), np.int32),
           "labels": np.full((n, seq_len), IGNORE, np.int32) if per_token else np.zeros((n,), np.int32)}
    for r, (ids, label) in enumerate(seqs):
        if len(ids) > seq_len:
            stats.truncated += 1
        ids = list(ids)[:seq_len]
        out["input_ids"][r, :len(ids)] = ids
        out["attention_mask"][r, :len(ids)] = 1
        if per_token:
            out["labels"][r, :len(ids)] = list(label)[:seq_len]
        else:
            out["labels"][r] = label
    stats.documents = stats.rows = n
    stats.tokens = int(out["attention_mask"].sum())
    stats.efficiency = stats.tokens / max(1, out["attention_mask"].size)
    return out


# ----------------------------------------------------------------------------------------------------
# The dataset the trainer reads
# ----------------------------------------------------------------------------------------------------

@dataclass
class TrainData:
    """Tokenised, packed rows and deterministic batches over them.

    rows: {name: [num_rows, seq_len] int32} (classification "labels" may be [num_rows]).
    Keys: input_ids, labels, segment_ids, positions (causal_lm); input_ids, attention_mask, labels
    (classification). pad_id: the id padding uses. stats: what packing did (efficiency etc.).
    """
    rows: dict[str, np.ndarray]
    task: str
    seq_len: int
    seed: int
    fingerprint: str
    pad_id: int = 0
    num_labels: int | None = None
    stats: PackStats = field(default_factory=PackStats)
    _loaders: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # (size, rows) -> Grain

    @classmethod
    def from_jsonl(cls, path: str, tokenizer: Tokenizer | str, *, seq_len: int, task: str = "causal_lm",
                   seed: int = 0, num_labels: int | None = None, pad_id: int | None = None,
                   progress: bool = True) -> "TrainData":
        """Reads, tokenises and packs a JSONL file (see the module docstring for the record kinds).

        tokenizer: a jaxmodels Tokenizer or a checkpoint directory holding tokenizer.json.
        seq_len: row length. task: "causal_lm", "sequence_classification" or "token_classification";
        the records must be of that task's kinds. seed: orders documents before packing and shuffles
        rows per epoch. num_labels: classification label range [0, num_labels) (checked when given,
        inferred as max label + 1 when not). pad_id: padding token id (default: the tokenizer's pad,
        else eos, else 0; for sequence classification it must equal the model config's pad_token_id,
        which pools the last non-pad token). progress: show a tqdm bar while tokenising.
        """
        from tqdm.auto import tqdm

        if task not in TASKS:
            raise DataError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        if not isinstance(seq_len, int) or seq_len < 2:
            raise DataError(f"seq_len must be an integer >= 2, got {seq_len!r}")
        if not 0 <= seed < 2**32:
            raise DataError(f"seed must be in [0, 2**32), got {seed}")
        tok = Tokenizer.from_checkpoint(tokenizer) if isinstance(tokenizer, str) else tokenizer
        records = _read(path)
        found = KIND_TASK[records[0][2]]
        if found != task:
            raise DataError(f"{path} holds {found} records ({records[0][2]!r} on line {records[0][0]}) but the task "
                            f"is {task}; pass task={found!r} or use a file of {task} records")
        if pad_id is None:
            pad_id = next((i for i in (tok.pad_token_id, tok.eos_token_id) if i is not None), 0)

        stats = PackStats()
        encoded = []
        for n, rec, kind in tqdm(records, desc=f"tokenising {os.path.basename(path)}", unit="rec",
                                 disable=not progress):
            where = f"{path} line {n}"
            if kind == "text":
                encoded.append(_encode_text(tok, rec["text"]))
            elif kind == "completion":
                encoded.append(_encode_completion(tok, rec["prompt"], rec["completion"]))
            elif kind == "messages":
                encoded.append(_encode_messages(tok, rec["messages"], where))
            elif kind == "label":
                encoded.append((tok.encode(rec["text"], add_special_tokens=True), rec["label"]))
            else:
                encoded.append(_encode_token_labels(tok, rec["text"], rec["labels"], where))
            if kind in ("label", "labels"):
                _check_labels(encoded[-1][1], num_labels, where)

        if task == "causal_lm":
            # Pack in a seeded order: otherwise rows follow the file, and a file sorted by source or length
            # would put correlated documents side by side in every row.
            order = np.random.default_rng(seed).permutation(len(encoded))
            rows = pack([encoded[i] for i in order], seq_len, pad_id, stats)
            if stats.rows == 0:
                raise DataError(f"{path}: no document has a target token left after tokenising; check that the "
                                "completions / assistant turns are not empty")
        else:
            rows = pad_rows(encoded, seq_len, pad_id, per_token=task == "token_classification", stats=stats)
            if stats.truncated:
                warnings.warn(f"{path}: {stats.truncated} of {stats.rows} sequences are longer than seq_len="
                              f"{seq_len} and were truncated; raise seq_len to keep them whole", stacklevel=2)
            if num_labels is None:
                num_labels = int(max(1, rows["labels"].max() + 1))
        return cls(rows=rows, task=task, seq_len=seq_len, seed=seed, pad_id=pad_id, num_labels=num_labels, stats=stats,
                   fingerprint=fingerprint(path, seq_len, task, tok))

    @property
    def num_rows(self) -> int:
        return int(self.rows["input_ids"].shape[0])

    def batches_per_epoch(self, batch_size: int) -> int:
        """Full batches per epoch (the last incomplete one is dropped)."""
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if self.num_rows < batch_size:
            raise DataError(f"the data has {self.num_rows} rows of seq_len={self.seq_len}, fewer than one batch of "
                            f"{batch_size}; lower the batch size to at most {self.num_rows}, lower seq_len, or add "
                            "data")
        return self.num_rows // batch_size

    def batch(self, index: int, batch_size: int, shard=None) -> dict[str, np.ndarray]:
        """Batch number `index`, counted across epochs: {name: [batch_size, ...]} numpy arrays.

        Epoch = index // batches_per_epoch(batch_size); each epoch visits every row at most once (the
        remainder rows of an epoch are skipped, differently each epoch), shuffled with a seed derived from
        (seed, epoch). The same data, seed, batch_size and index always give the same batch, so the
        trainer checkpoints its data position as the next index.

        shard: Grain `ShardOptions` (e.g. `jaxmodels.distributed.batch_shard`, or `ShardByJaxProcess`): only
        block `shard_index` of `shard_count` equal blocks of the batch's rows is read and returned
        ([batch_size / shard_count, ...]); a multi-host run reads on each host just the rows its devices hold.
        """
        if index < 0:
            raise DataError(f"batch index must be >= 0, got {index}")
        if shard is None or shard.shard_count == 1:
            return self._loader(batch_size)[index]
        if batch_size % shard.shard_count:
            raise DataError(f"batch_size {batch_size} does not split into {shard.shard_count} equal per-process "
                            f"shards; use a multiple of {shard.shard_count}")
        size = batch_size // shard.shard_count
        return self._loader(batch_size, shard.shard_index * size, (shard.shard_index + 1) * size)[index]

    def _loader(self, batch_size: int, lo: int = 0, hi: int | None = None):
        """Grain pipeline over row indices: shuffle (reseeded each epoch by Grain), batch, then gather rows
        [lo, hi) of each batch (this process's shard; the others' rows are never read)."""
        import grain

        self.batches_per_epoch(batch_size)  # the clear error for too few rows
        hi = batch_size if hi is None else hi
        key = (batch_size, lo, hi)
        if key not in self._loaders:
            rows = self.rows
            self._loaders[key] = (grain.MapDataset.range(self.num_rows)
                                  .shuffle(seed=self.seed)
                                  .batch(batch_size, drop_remainder=True, batch_fn=np.asarray)
                                  .map(lambda idx: {k: v[idx[lo:hi]] for k, v in rows.items()}))
        return self._loaders[key]

    def describe(self) -> str:
        """One line for the trainer's log: rows, documents, packing efficiency, splits/truncations."""
        s = self.stats
        extra = []
        if s.split_documents:
            extra.append(f"{s.split_documents} documents split into seq_len chunks")
        if s.dropped_chunks:
            extra.append(f"{s.dropped_chunks} chunks without targets dropped")
        if s.truncated:
            extra.append(f"{s.truncated} sequences truncated")
        return (f"{self.task}: {s.documents} documents -> {s.rows} rows of {self.seq_len} tokens, "
                f"{s.efficiency:.1%} non-padding" + ("; " + ", ".join(extra) if extra else ""))


def _check_labels(labels, num_labels: int | None, where: str) -> None:
    values = [labels] if isinstance(labels, int) else [x for x in labels if x != IGNORE]
    for x in values:
        if x < 0 or (num_labels is not None and x >= num_labels):
            bound = f"[0, {num_labels})" if num_labels is not None else ">= 0"
            raise DataError(f"{where}: label {x} is outside {bound}; fix the label or set num_labels to the "
                            "model's number of classes")


def fingerprint(path: str, seq_len: int, task: str, tokenizer: Tokenizer) -> str:
    """A short hash of the file bytes, seq_len, task and the tokenizer's vocabulary size.

    The trainer stores it with a checkpoint and refuses to resume when it differs: a batch index only
    means the same batch on the same rows. (The seed is not included; the trainer stores it itself.)
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    h.update(f"|{seq_len}|{task}|{tokenizer.tok.get_vocab_size(with_added_tokens=True)}".encode())
    return h.hexdigest()[:16]
