"""train/data.py: JSONL -> tokenised, masked, packed rows -> deterministic Grain batches (CPU, seconds)."""

import json
import os

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, processors

from jaxmodels.tokenizer import Tokenizer
from jaxmodels.train.data import IGNORE, DataError, TrainData, load_records, pack

WORDS = ("the cat sat on a mat and dog ran to red ball user assistant system : hello world how are you "
         "fine thanks").split()
# Each assistant turn ends with EOS, so the model learns to end its turn.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} "
            "{% if m['role'] == 'assistant' %}{{ eos_token }} {% endif %}{% endfor %}"
            "{% if add_generation_prompt %}assistant : {% endif %}")


def make_tokenizer(path, template=TEMPLATE):
    """A WordLevel tokenizer whose post-processor adds BOS, like Llama/DeepSeek tokenizers do."""
    os.makedirs(path, exist_ok=True)
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "<s>", "</s>"] + WORDS)}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["[PAD]", "[UNK]", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tok.save(os.path.join(path, "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "[PAD]", "unk_token": "[UNK]"}
    if template is not None:
        config["chat_template"] = template
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return Tokenizer.from_checkpoint(str(path))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


PAD, BOS, EOS = 0, 2, 3


def write(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def segments(row):
    """[(start, stop)] of each segment in a packed row."""
    seg = row["segment_ids"]
    starts = [int(np.argmax(seg == s)) for s in range(1, seg.max() + 1)]
    return [(a, a + int((seg == s).sum())) for s, a in enumerate(starts, start=1)]


# ----------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------

def test_text_packing(tmp_path, tok):
    texts = ["the cat sat", "a dog ran to the ball", "hello", "how are you", "fine thanks"]
    path = write(tmp_path / "d.jsonl", [{"text": t} for t in texts] + [""])  # a blank line is skipped
    data = TrainData.from_jsonl(path, tok, seq_len=8, task="causal_lm", seed=0, progress=False)
    r = data.rows
    assert set(r) == {"input_ids", "labels", "segment_ids", "positions"}
    assert all(v.dtype == np.int32 and v.shape == (data.num_rows, 8) for v in r.values())

    found = []
    for i in range(data.num_rows):
        row = {k: v[i] for k, v in r.items()}
        segs = segments(row)
        # segments are contiguous and numbered 1, 2, ... from the row start
        assert segs[0][0] == 0 and all(b == a2 for (_, b), (a2, _) in zip(segs, segs[1:]))
        for a, b in segs:
            ids = row["input_ids"][a:b]
            assert row["positions"][a:b].tolist() == list(range(b - a))  # restart per document
            assert row["labels"][a] == IGNORE  # never predict across a document boundary
            assert row["labels"][a + 1:b].tolist() == ids[1:].tolist()  # text: every other token a target
            assert ids[0] == BOS and ids[-1] == EOS  # BOS from the post-processor, EOS appended
            found.append(tok.decode(ids))
        pad = slice(segs[-1][1], 8)  # padding only after the last segment
        assert (row["input_ids"][pad] == PAD).all() and (row["labels"][pad] == IGNORE).all()
        assert (row["segment_ids"][pad] == 0).all() and (row["positions"][pad] == 0).all()
    assert sorted(found) == sorted(texts)  # every document exactly once, whole
    nonpad = (r["segment_ids"] > 0).mean()
    assert data.stats.efficiency == pytest.approx(nonpad) and f"{nonpad:.1%}" in data.describe()
    # documents of 5, 8, 3, 5 and 4 tokens (BOS and EOS included) fit 4 rows of 8, no splits
    assert data.num_rows == 4 and data.stats.split_documents == 0


def test_long_document_split_into_chunks(tmp_path, tok):
    text = " ".join(WORDS[:10])  # BOS + 10 words + EOS = 12 tokens
    path = write(tmp_path / "d.jsonl", [{"text": text}])
    data = TrainData.from_jsonl(path, tok, seq_len=5, task="causal_lm", seed=0, progress=False)
    ids = tok.encode(text) + [EOS]
    assert data.stats.split_documents == 1 and "split" in data.describe()
    chunks = sorted((data.rows["input_ids"][i][data.rows["segment_ids"][i] == s].tolist(),
                     data.rows["positions"][i][data.rows["segment_ids"][i] == s].tolist(),
                     data.rows["labels"][i][data.rows["segment_ids"][i] == s].tolist())
                    for i in range(data.num_rows) for s in range(1, data.rows["segment_ids"][i].max() + 1))
    assert sorted(c[0] for c in chunks) == sorted([ids[0:5], ids[5:10], ids[10:12]])
    for c_ids, c_pos, c_labels in chunks:
        assert c_pos == list(range(len(c_ids)))  # each chunk an independent sequence
        assert c_labels == [IGNORE] + c_ids[1:]


def test_pack_drops_chunks_without_targets():
    docs = [([5, 6, 7, 8, 9, 10], [IGNORE] * 4 + [9, 10])]  # a prompt longer than a row, then the completion
    rows = pack(docs, 4, pad_id=0)
    assert rows["input_ids"].tolist() == [[9, 10, 0, 0]]
    assert rows["labels"].tolist() == [[IGNORE, 10, IGNORE, IGNORE]]


# ----------------------------------------------------------------------------------------------------
# Loss masks
# ----------------------------------------------------------------------------------------------------

def targets(data):
    """Per segment: the target token ids (labels != -100), in row order."""
    out = []
    for i in range(data.num_rows):
        for s in range(1, data.rows["segment_ids"][i].max() + 1):
            lab = data.rows["labels"][i][data.rows["segment_ids"][i] == s]
            out.append(lab[lab != IGNORE].tolist())
    return out


def test_prompt_completion_masking(tmp_path, tok):
    # The boundary falls inside "cat": the word starts in the prompt, so it is context, not a target.
    path = write(tmp_path / "d.jsonl", [{"prompt": "the ca", "completion": "t sat on a mat"}])
    data = TrainData.from_jsonl(path, tok, seq_len=16, task="causal_lm", seed=0, progress=False)
    row = data.rows["input_ids"][0]
    assert row[:8].tolist() == tok.encode("the cat sat on a mat") + [EOS]
    assert targets(data) == [tok.encode("sat on a mat", add_special_tokens=False) + [EOS]]


def test_messages_masking_with_chat_template(tmp_path, tok):
    msgs = [{"role": "system", "content": "hello"}, {"role": "user", "content": "how are you"},
            {"role": "assistant", "content": "fine thanks"}, {"role": "user", "content": "the cat"},
            {"role": "assistant", "content": "sat on a mat"}]
    path = write(tmp_path / "d.jsonl", [{"messages": msgs}])
    data = TrainData.from_jsonl(path, tok, seq_len=64, task="causal_lm", seed=0, progress=False)
    n = int((data.rows["segment_ids"][0] > 0).sum())
    # The ids are the template's (which writes BOS itself: no second BOS, no appended EOS)
    assert data.rows["input_ids"][0, :n].tolist() == tok.apply_chat_template(msgs, add_generation_prompt=False)
    assert data.rows["input_ids"][0, :2].tolist() == [BOS, tok.token_id("system")]
    words = lambda s: tok.encode(s, add_special_tokens=False)
    assert targets(data) == [words("fine thanks") + [EOS] + words("sat on a mat") + [EOS]]


def test_mixed_lm_kinds_share_a_file(tmp_path, tok):
    path = write(tmp_path / "d.jsonl", [{"text": "hello world"}, {"prompt": "how are", "completion": " you"},
                                        {"messages": [{"role": "user", "content": "hello"},
                                                      {"role": "assistant", "content": "fine"}]}])
    data = TrainData.from_jsonl(path, tok, seq_len=32, task="causal_lm", seed=0, progress=False)
    ids = tok.token_id
    assert sorted(targets(data)) == sorted([[ids("hello"), ids("world"), EOS], [ids("you"), EOS], [ids("fine"), EOS]])


def test_messages_need_a_prefix_stable_chat_template(tmp_path):
    msgs = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "fine"}]}
    path = write(tmp_path / "d.jsonl", [msgs])
    bare = make_tokenizer(tmp_path / "bare", template=None)
    with pytest.raises(DataError, match="line 1.*chat template"):
        TrainData.from_jsonl(path, bare, seq_len=16, task="causal_lm", seed=0, progress=False)
    # Rendering depends on the number of messages: earlier renderings are not prefixes of the full one
    unstable = make_tokenizer(tmp_path / "unstable", template="{{ messages|length }} " + TEMPLATE)
    with pytest.raises(DataError, match="line 1.*not prefix-stable"):
        TrainData.from_jsonl(path, unstable, seq_len=16, task="causal_lm", seed=0, progress=False)


# ----------------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------------

def test_sequence_classification_rows(tmp_path, tok):
    recs = [{"text": "the cat sat", "label": 1}, {"text": "a dog", "label": 0},
            {"text": "the cat sat on a mat and the dog ran", "label": 2}]
    path = write(tmp_path / "d.jsonl", recs)
    with pytest.warns(UserWarning, match="1 of 3 sequences.*truncated"):
        data = TrainData.from_jsonl(path, tok, seq_len=6, task="sequence_classification", seed=0,
                                    num_labels=3, progress=False)
    r = data.rows
    assert set(r) == {"input_ids", "attention_mask", "labels"}
    assert r["labels"].tolist() == [1, 0, 2] and r["labels"].shape == (3,)  # file order, no packing
    assert r["input_ids"][0].tolist() == tok.encode("the cat sat") + [PAD, PAD]
    assert r["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0]
    assert r["input_ids"][2].tolist() == tok.encode("the cat sat on a")  # truncated to seq_len
    assert data.stats.truncated == 1
    with pytest.raises(DataError, match="line 3: label 2 is outside \\[0, 2\\)"):
        TrainData.from_jsonl(path, tok, seq_len=6, task="sequence_classification", seed=0, num_labels=2,
                             progress=False)


def test_token_classification_rows(tmp_path, tok):
    path = write(tmp_path / "d.jsonl", [{"text": "the cat sat", "labels": [0, 1, -100]}])
    data = TrainData.from_jsonl(path, tok, seq_len=6, task="token_classification", seed=0, progress=False)
    assert data.rows["input_ids"][0].tolist() == [BOS] + tok.encode("the cat sat", add_special_tokens=False) + [PAD] * 2
    # BOS (added by the tokenizer, not in the text) and padding are ignored; the labels line up with the words
    assert data.rows["labels"][0].tolist() == [IGNORE, 0, 1, IGNORE, IGNORE, IGNORE]
    assert data.rows["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0]
    assert data.num_labels == 2


# ----------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------

def lm_data(tmp_path, tok, seed=0):
    rng = np.random.default_rng(0)
    path = tmp_path / "lm.jsonl"
    if not path.exists():
        write(path, [{"text": " ".join(rng.choice(WORDS, 6))} for _ in range(24)])  # 8 tokens each: 1 row each
    return TrainData.from_jsonl(str(path), tok, seq_len=8, task="causal_lm", seed=seed, progress=False)


def test_batches_deterministic_and_reshuffled_per_epoch(tmp_path, tok):
    data = lm_data(tmp_path, tok)
    assert data.num_rows == 24 and data.batches_per_epoch(4) == 6
    again = lm_data(tmp_path, tok)
    for k in data.rows:
        np.testing.assert_array_equal(data.rows[k], again.rows[k])  # same input -> same rows
    assert data.fingerprint == again.fingerprint
    b = data.batch(7, 4)
    assert set(b) == set(data.rows) and all(v.shape == (4, 8) for v in b.values())
    for k in b:
        np.testing.assert_array_equal(b[k], again.batch(7, 4)[k])  # a resumed run sees the same batch

    def epoch(e):
        return np.concatenate([data.batch(e * 6 + i, 4)["input_ids"] for i in range(6)])

    all_rows = sorted(map(tuple, data.rows["input_ids"].tolist()))
    e0, e1 = epoch(0), epoch(1)
    assert sorted(map(tuple, e0.tolist())) == all_rows  # every row exactly once per epoch
    assert sorted(map(tuple, e1.tolist())) == all_rows
    assert not np.array_equal(e0, e1)  # ...in a different order each epoch
    other = lm_data(tmp_path, tok, seed=1)
    assert not np.array_equal(other.batch(0, 4)["input_ids"], data.batch(0, 4)["input_ids"])


def test_incomplete_batch_dropped(tmp_path, tok):
    data = lm_data(tmp_path, tok)
    assert data.batches_per_epoch(5) == 4  # 24 rows: 4 batches of 5, 4 rows left for another epoch
    seen = np.concatenate([data.batch(i, 5)["input_ids"] for i in range(4)])
    assert len({tuple(x) for x in seen.tolist()}) == 20


def test_fingerprint_tracks_data_and_settings(tmp_path, tok):
    data = lm_data(tmp_path, tok)
    path = str(tmp_path / "lm.jsonl")
    assert TrainData.from_jsonl(path, tok, seq_len=16, task="causal_lm", progress=False).fingerprint != data.fingerprint
    with open(path, "a") as f:
        f.write(json.dumps({"text": "hello"}) + "\n")
    assert TrainData.from_jsonl(path, tok, seq_len=8, task="causal_lm", progress=False).fingerprint != data.fingerprint


# ----------------------------------------------------------------------------------------------------
# Errors a user can cause: a DataError naming the cause, never a traceback from inside
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lines, match", [
    (['{"text": "hello"}', '', '{"text": "the cat" '], r"line 3: not valid JSON"),
    (['["the cat"]'], r"line 1: expected a JSON object"),
    (['{"text": "hello"}', '{"body": "hello"}'],
     r"line 2: none of the known fields \(found \['body'\]\).*\"prompt\", \"completion\""),
    (['{"prompt": "hello"}'], r"line 1: .*needs both 'prompt' and 'completion'"),
    (['{"text": 3}'], r"line 1: 'text' must be a string"),
    (['{"text": "hello"}', '{"text": "hello", "label": 1}'],
     r"mixes records.*causal_lm \(line 1.*sequence_classification \(line 2"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], r"line 1: no 'assistant' message"),
])
def test_record_errors(tmp_path, lines, match):
    path = write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=match) as e:
        load_records(path)
    assert str(path) in str(e.value)


def test_missing_and_empty_file(tmp_path, tok):
    with pytest.raises(DataError, match="does not exist"):
        load_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="no records"):
        load_records(write(tmp_path / "empty.jsonl", ["", "  "]))


def test_token_label_length_mismatch(tmp_path, tok):
    path = write(tmp_path / "d.jsonl", [{"text": "hello", "labels": [0]}, {"text": "the cat sat", "labels": [0, 1]}])
    with pytest.raises(DataError, match="line 2: 2 labels for 3 tokens"):
        TrainData.from_jsonl(path, tok, seq_len=8, task="token_classification", seed=0, progress=False)


def test_task_must_match_records(tmp_path, tok):
    path = write(tmp_path / "d.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match="holds causal_lm records.*task='causal_lm'"):
        TrainData.from_jsonl(path, tok, seq_len=8, task="sequence_classification", progress=False)
    with pytest.raises(DataError, match="unknown task"):
        TrainData.from_jsonl(path, tok, seq_len=8, task="lm", progress=False)


def test_too_few_rows_for_a_batch(tmp_path, tok):
    path = write(tmp_path / "d.jsonl", [{"text": "hello"}, {"text": "the cat"}])
    data = TrainData.from_jsonl(path, tok, seq_len=16, task="causal_lm", progress=False)
    assert data.num_rows == 1
    with pytest.raises(DataError, match="1 rows of seq_len=16, fewer than one batch of 8.*at most 1"):
        data.batch(0, 8)
