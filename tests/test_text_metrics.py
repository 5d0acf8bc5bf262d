"""Text metrics on inputs whose answers are known by hand."""
import math

import numpy as np
import pytest

from dblocks import text_metrics as tm


def test_bits_per_token_and_perplexity():
    logp = np.log([0.5, 0.25, 0.125, 1.0])
    assert tm.bits_per_token(logp) == pytest.approx((1 + 2 + 3 + 0) / 4)
    assert tm.perplexity(logp) == pytest.approx(2 ** 1.5)


def test_entropy_bits():
    logp = np.log([[0.5, 0.5, 1e-300], [1.0, 1e-300, 1e-300]])
    assert tm.entropy_bits(logp) == pytest.approx(0.5)   # 1 bit and 0 bits


def test_mixture_logprob_is_the_log_of_the_average():
    p = np.array([[0.9, 1e-30], [0.1, 0.5]])                   # [draws, tokens]
    np.testing.assert_allclose(tm.mixture_logprob(np.log(p)), np.log([0.5, 0.25 + 5e-31]))
    very_small = np.array([[-2000.0], [-2000.0 + math.log(3)]])   # underflows in linear space, not in log space
    np.testing.assert_allclose(tm.mixture_logprob(very_small), [-2000.0 + math.log(2.0)])


def test_distinct_n():
    texts = ["a b a b", "a c"]
    # unigrams: a b a b a c -> {a, b, c} = 3 of 6; bigrams: ab ba ab ac -> 3 distinct of 4
    assert tm.distinct_n(texts, 1) == pytest.approx(3 / 6)
    assert tm.distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert math.isnan(tm.distinct_n(["a"], 2))


def test_repetition_rate():
    # "x y z x y z": trigrams xyz yzx zxy xyz -> one repeat of 4; "p q r s": none -> mean 1/8
    assert tm.repetition_rate(["x y z x y z", "p q r s"], 3) == pytest.approx((1 / 4 + 0) / 2)
    assert tm.repetition_rate(["go " * 10], 3) == pytest.approx(7 / 8)   # 8 trigrams, all the same
    assert math.isnan(tm.repetition_rate(["too short"], 3))


def test_text_summary_keys():
    s = tm.text_summary(["one two three four"], ns=(1, 2), rep_n=2)
    assert s == {"distinct_1": 1.0, "distinct_2": 1.0, "repetition_2": 0.0}


def test_sentencepiece_vocab_and_packed_lm1b_source(tmp_path, monkeypatch):
    """The LM1B path with a stand-in SentencePiece module and tfds mock data: tokenized sentences joined by EOS,
    cached, cut into windows; without the package the error says what to install."""
    import sys
    import types

    from dblocks import tokenized
    from dblocks.data import DatasetMissingError
    tfds = pytest.importorskip("tensorflow_datasets")
    model = tmp_path / "sp.model"
    model.write_text("fake")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(DatasetMissingError, match="pip install sentencepiece"):
        tokenized.load_tokenizer(str(model))

    class FakeSP:   # one piece per character, ids 3.., eos 2
        def __init__(self, model_file):
            self.model_file = model_file

        def get_piece_size(self):
            return 300

        def eos_id(self):
            return 2

        def encode(self, text):   # a str, or a list of them (a batch), as SentencePiece takes
            if isinstance(text, list):
                return [self.encode(t) for t in text]
            return [3 + ord(ch) % 200 for ch in text]

        def decode(self, ids):
            return "".join(chr(i - 3) for i in ids)

    monkeypatch.setitem(sys.modules, "sentencepiece", types.SimpleNamespace(SentencePieceProcessor=FakeSP))
    vocab = tokenized.load_tokenizer(str(model))
    assert vocab.size == 300 and vocab.decode(vocab.encode("abc")) == "abc"

    def as_source(builder, split, **kw):
        return [{"text": f"s{i}".encode()} for i in range(6)]

    with tfds.testing.mock_data(num_examples=6, as_data_source_fn=as_source):
        src = tokenized.packed_source("lm1b", "train", 4, vocab)
    # 6 sentences of 2 pieces + EOS = 18 tokens -> 4 windows of 4
    assert len(src) == 4
    np.testing.assert_array_equal(src.get(np.arange(1))["tokens"][0], vocab.encode("s0").tolist() + [2] +
                                  vocab.encode("s")[:1].tolist())
    assert list(tmp_path.glob("lm1b_train_*.npy"))   # cached next to the tokenizer
