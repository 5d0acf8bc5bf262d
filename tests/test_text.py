"""Text data: vocabulary, the whole-work Shakespeare split (no leaks), text8's fixed split, tfds text, windows."""
import os
import zipfile

import numpy as np
import pytest

from dblocks import data as data_lib
from dblocks import text


def test_vocab_roundtrip_and_unknowns():
    v = text.SHAKESPEARE_VOCAB
    s = "To be, or not to be:\nthat is the question."
    ids = v.encode(s)
    assert ids.dtype == np.int32 and ids.shape == (len(s),) and ids.max() < v.size
    assert v.decode(ids) == s
    # a non-ASCII character takes the other encoding path and maps to the unknown character
    assert v.decode(v.encode("café")) == "caf "
    np.testing.assert_array_equal(v.encode("abc"), v.encode("abcé")[:3])
    assert text.TEXT8_VOCAB.decode(text.TEXT8_VOCAB.encode("Hello world")) == " ello world"
    assert text.vocab_for("text8").size == 27 and text.vocab_for("shakespeare").size == 96
    with pytest.raises(ValueError, match="unknown text dataset"):
        text.vocab_for("nope")


def test_shakespeare_split_is_by_whole_works():
    works = text.shakespeare_works()
    assert len(works) == 42
    splits = {s: set(text.shakespeare_split(s)) for s in ("train", "validation", "test")}
    assert not splits["train"] & splits["test"] and not splits["train"] & splits["validation"]
    assert not splits["validation"] & splits["test"]
    assert set().union(*splits.values()) == set(works)
    assert splits["test"] == {"hamlet", "sonnets", "tempest", "henry_v"}


@pytest.fixture(scope="module")
def train_and_test_ids():
    train, v = text.split_text("shakespeare", "train")
    test, _ = text.split_text("shakespeare", "test")
    return v.encode(train), v.encode(test), test


def test_no_test_passage_occurs_in_train(train_and_test_ids):
    """No 64-character window of the test works appears anywhere in the training text (title pages such as
    'by William Shakespeare\\n\\n\\n\\n\\nPERSONS REPRESENTED' are the longest shared strings, under 60)."""
    train, test, _ = train_and_test_ids
    assert len(text.shared_windows(train, test, width=64)) == 0


def test_leak_check_finds_an_injected_passage(train_and_test_ids):
    train, test, test_text = train_and_test_ids
    passage = test[100_000:100_200]            # 200 characters of a test work copied into "train"
    leaky = np.concatenate([train[:50_000], passage, train[50_000:60_000]])
    hits = text.shared_windows(leaky, test, width=64)
    assert len(hits) == 200 - 64 + 1
    assert hits.min() == 100_000 and hits.max() == 100_200 - 64
    # shared short strings exist: the check is about passages, not about single lines
    assert len(text.shared_windows(train, test, width=30)) > 0


def test_windows_come_from_their_split():
    src, v = text.load_text("shakespeare", "test", 128)
    full, _ = text.split_text("shakespeare", "test")
    assert src.get(np.arange(len(src)))["tokens"].shape == (len(full) // 128, 128)
    row = 17
    assert v.decode(src.get(np.array([row]))["tokens"][0]) == full[row * 128:(row + 1) * 128]
    with pytest.raises(ValueError, match="fewer than one sequence"):
        text.sequence_source(np.arange(10), 11)


def test_batch_order_is_seeded_and_resumable():
    a = data_lib.batch_indices(1000, 32, seed=3, unit=1, step=40)
    np.testing.assert_array_equal(a, data_lib.batch_indices(1000, 32, seed=3, unit=1, step=40))
    assert not np.array_equal(a, data_lib.batch_indices(1000, 32, seed=3, unit=2, step=40))
    epoch = np.concatenate([data_lib.batch_indices(1000, 32, 3, 1, s) for s in range(31)])
    assert len(np.unique(epoch)) == 31 * 32   # one epoch visits each window at most once


def test_text8_split_from_file_and_zip(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    chars = "".join(rng.choice(list(" abcdefghijklmnopqrstuvwxyz"), 100))
    monkeypatch.setattr(text, "TEXT8_SPLITS", {"train": (0, 90), "validation": (90, 95), "test": (95, 100)})
    (tmp_path / "text8").write_text(chars)
    assert text.text8_split("train", str(tmp_path)) == chars[:90]
    assert text.text8_split("test", str(tmp_path / "text8")) == chars[95:]
    with zipfile.ZipFile(tmp_path / "text8.zip", "w") as z:
        z.writestr("text8", chars)
    os.remove(tmp_path / "text8")
    assert text.split_text("text8", "validation", path=str(tmp_path))[0] == chars[90:95]
    monkeypatch.delenv("DBLOCKS_TEXT8", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "nohome"))
    with pytest.raises(data_lib.DatasetMissingError, match="mattmahoney.net/dc/text8.zip"):
        text.text8_split("train", str(tmp_path / "missing"))


def test_tfds_text_through_data_source():
    tfds = pytest.importorskip("tensorflow_datasets")

    def as_source(builder, split, **kw):
        return [{"text": f"{split} line {i}".encode()} for i in range(3)]

    with tfds.testing.mock_data(num_examples=3, as_data_source_fn=as_source):
        txt, vocab = text.split_text("tfds:tiny_shakespeare", "test")
    assert txt == "test line 0\ntest line 1\ntest line 2" and vocab is text.SHAKESPEARE_VOCAB


def test_own_text_with_a_sentencepiece_model_is_encoded_in_batches(tmp_path, monkeypatch):
    spm = pytest.importorskip("sentencepiece")
    from dblocks import config as config_lib
    from dblocks import tokenized, user_data
    from dblocks.tasks import get_task
    from experiments.configs import tiny_ar
    lines = [t for t in text.shakespeare_works()[text.shakespeare_split("train")[0]].split("\n") if t.strip()][:600]
    (tmp_path / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=100, model_type="unigram", minloglevel=2)
    c = tiny_ar.get_config()
    c.data.name, c.data.tokenizer, c.data.seq_len = f"text:{tmp_path / 'corpus.txt'}", str(tmp_path / "sp.model"), 16
    user_data.resolve_fields(c)
    config_lib.validate(c)                                    # text: with a tokenizer is accepted
    task = get_task(c)
    assert task.vocab.size == 100
    calls = []
    encode = task.vocab.sp.encode
    monkeypatch.setattr(task.vocab.sp, "encode", lambda x, *a, **k: calls.append(len(x)) or encode(x, *a, **k))
    monkeypatch.setattr(tokenized, "ENCODE_BATCH", 1000)
    src = task.source("train")
    train_lines = [t for t in text.user_text(c.data.name, "train").split("\n") if t.strip()]
    expected = np.concatenate([np.append(encode(t), task.vocab.eos()) for t in train_lines]).astype(np.int32)
    n = len(expected) // 16
    np.testing.assert_array_equal(src.arrays["tokens"], expected[:n * 16].reshape(n, 16))
    assert calls == [len(train_lines)]                        # every line in one call, not one call per line
    chunks = []
    monkeypatch.setattr(task.vocab, "encode_batch", lambda x: chunks.append(len(x)) or [encode(t) for t in x])
    np.testing.assert_array_equal(tokenized.encode_lines(train_lines, task.vocab, batch=100), expected)
    assert chunks == [100] * (len(train_lines) // 100) + ([len(train_lines) % 100] if len(train_lines) % 100 else [])


def test_a_tokenizer_without_sentencepiece_installed_names_the_extra(tmp_path, monkeypatch):
    import sys
    from dblocks import tokenized
    monkeypatch.setitem(sys.modules, "sentencepiece", None)   # as if not installed
    with pytest.raises(data_lib.DatasetMissingError, match=r"pip install 'dblocks\[text\]'"):
        tokenized.load_tokenizer(str(tmp_path / "sp.model"))


def test_tokenizer_trained_on_the_train_split_into_the_workdir(tmp_path):
    pytest.importorskip("sentencepiece")
    from dblocks import config as config_lib
    from dblocks import user_data
    from dblocks.tasks import get_task
    from experiments.configs import tiny_ar
    lines = [t for t in text.shakespeare_works()[text.shakespeare_split("train")[0]].split("\n") if t.strip()][:400]
    (tmp_path / "corpus.txt").write_text("\n".join(lines))
    c = tiny_ar.get_config()
    c.data.name, c.data.tokenizer, c.data.seq_len = f"text:{tmp_path / 'corpus.txt'}", "train:80", 16
    user_data.resolve_fields(c, str(tmp_path / "run"))
    assert c.data.tokenizer == str(tmp_path / "run" / "tokenizer.model")
    assert get_task(c).vocab.size == 80 and len(get_task(c).source("train")) > 0
    stamp = os.stat(c.data.tokenizer).st_mtime_ns
    c.data.tokenizer = "train:80"
    user_data.resolve_fields(c, str(tmp_path / "run"))          # a resumed run reuses the model
    assert os.stat(c.data.tokenizer).st_mtime_ns == stamp
    c.data.tokenizer = "train:lots"
    with pytest.raises(config_lib.ConfigError, match="train:VOCAB"):
        user_data.resolve_fields(c, str(tmp_path / "run"))


def test_no_tokenizer_is_trained_for_a_config_that_fails(tmp_path):
    """train:VOCAB trains into the workdir only after every other field passed: a bad config writes nothing."""
    pytest.importorskip("sentencepiece")
    from dblocks import config as config_lib
    from dblocks import train as train_lib
    from experiments.configs import tiny_ar
    (tmp_path / "corpus.txt").write_text("\n".join(f"line {i} of some text to read" for i in range(300)))
    c = tiny_ar.get_config()
    c.data.name, c.data.tokenizer, c.data.seq_len = f"text:{tmp_path / 'corpus.txt'}", "train:60", 16
    c.blocks.num_blocks = 0
    with pytest.raises(config_lib.ConfigError, match="num_blocks"):
        train_lib.train(c, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "tokenizer.model")
