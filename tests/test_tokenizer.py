"""The SentencePiece tokenizer: training, files, padding/truncation, pickling."""
import pickle

import pytest
import torch

from limoe.tokenizer import EOS_ID, PAD_ID, Tokenizer

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
THINGS = ["cat", "dog", "heart", "star", "face", "flag", "car", "tree", "apple", "moon"]
CORPUS = [f"a {c} {t} emoji, number {i}" for i in range(4) for c in COLOURS for t in THINGS]  # 320 strings


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(CORPUS, vocab_size=36, context_length=8)


def test_training_on_a_small_corpus_reaches_the_requested_size(tokenizer):
    assert tokenizer.vocab_size == 36
    assert tokenizer.context_length == 8
    assert (tokenizer.pad_id, tokenizer.eos_id) == (0, 2)


def test_a_vocabulary_too_large_for_the_data_does_not_crash():
    small = Tokenizer.train(["a red cat", "a blue dog"], vocab_size=8000)
    assert 3 < small.vocab_size < 8000
    assert small.decode(small("a red cat")[0]) == "a red cat"


def test_empty_corpus_is_a_clear_error():
    with pytest.raises(ValueError, match="empty corpus"):
        Tokenizer.train(["", "   "])


def test_tokens_are_ids_then_eos_then_padding(tokenizer):
    tokens = tokenizer(["a red cat", "dog"])
    assert tokens.dtype == torch.long and tokens.shape == (2, 8)
    for row in tokens.tolist():
        eos = row.index(EOS_ID)
        assert row.count(EOS_ID) == 1
        assert all(t not in (PAD_ID, EOS_ID) for t in row[:eos])
        assert all(t == PAD_ID for t in row[eos + 1 :])
    assert tokenizer("a red cat").shape == (1, 8)  # a single string is a batch of one


def test_long_texts_are_truncated_so_eos_always_fits(tokenizer):
    long_text = " ".join(["purple heart"] * 20)
    tokens, dropped = tokenizer.encode_with_truncation([long_text, "cat"])
    assert tokens[0, -1] == EOS_ID
    assert PAD_ID not in tokens[0].tolist()
    assert dropped[0] > 0 and dropped[1] == 0
    assert tokenizer([long_text], context_length=4).shape == (1, 4)
    assert tokenizer([long_text], context_length=4)[0, 3] == EOS_ID


def test_text_is_case_folded_and_decodes_back(tokenizer):
    assert torch.equal(tokenizer("A RED Cat"), tokenizer("a red cat"))
    assert tokenizer.decode(tokenizer("a red cat", context_length=16)[0]) == "a red cat"
    assert tokenizer.decode(tokenizer(["a red cat", "a dog"], context_length=16)) == ["a red cat", "a dog"]


def test_save_and_load_round_trip(tokenizer, tmp_path):
    path = tokenizer.save(tmp_path / "tokenizer.model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.model", "tokenizer.model.json"]
    loaded = Tokenizer.load(path)
    assert loaded.model_proto == tokenizer.model_proto
    assert loaded.context_length == 8
    assert torch.equal(loaded(CORPUS[:5]), tokenizer(CORPUS[:5]))
    assert Tokenizer.load(tmp_path, context_length=12).context_length == 12  # a folder holding tokenizer.model


def test_saved_file_is_a_plain_sentencepiece_model(tokenizer, tmp_path):
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(tokenizer.save(tmp_path / "t.model")))
    assert processor.get_piece_size() == tokenizer.vocab_size


def test_pickle_round_trip_for_dataloader_workers(tokenizer):
    copy = pickle.loads(pickle.dumps(tokenizer))
    assert copy.context_length == tokenizer.context_length
    assert torch.equal(copy(CORPUS[:3]), tokenizer(CORPUS[:3]))


def test_a_file_that_is_not_a_sentencepiece_model_is_a_value_error_naming_it(tmp_path):
    garbage = tmp_path / "tokenizer.model"
    garbage.write_bytes(b"\x00garbage" * 20)
    with pytest.raises(ValueError, match=rf"{garbage}: not a SentencePiece model \(160 bytes"):
        Tokenizer.load(garbage)


def test_demo_tokenizer_kinds_train_the_named_sentencepiece_type_and_cache_each_kind_apart(tmp_path, capsys):
    import sentencepiece.sentencepiece_model_pb2 as model_pb2

    from data_pipelines.testing import write_fake_shards
    from launch.demo import prepare_tokenizer, sentencepiece_kind, tokenizer_kind
    from limoe.tokenizer import load_tokenizer

    assert sentencepiece_kind("sp300") == ("unigram", 300) and sentencepiece_kind("spbpe120") == ("bpe", 120)
    assert sentencepiece_kind("bpe") is None and sentencepiece_kind("spbpe") is None
    for bad in ("sp0", "spx", "wordpiece", "spbpe-3"):
        with pytest.raises(ValueError, match="unknown tokenizer"):
            tokenizer_kind(bad)
    write_fake_shards(tmp_path / "shards", num_samples=40)
    unigram = prepare_tokenizer(tmp_path, "sp60", 8)
    bpe = prepare_tokenizer(tmp_path, "spbpe60", 8)
    assert unigram.name == "tokenizer-sp60.model" and bpe.name == "tokenizer-spbpe60.model"
    for path, expected in ((unigram, model_pb2.TrainerSpec.UNIGRAM), (bpe, model_pb2.TrainerSpec.BPE)):
        proto = model_pb2.ModelProto()
        proto.ParseFromString(path.read_bytes())  # the SentencePiece model file itself
        assert proto.trainer_spec.model_type == expected, path
        assert load_tokenizer(path).vocab_size <= 60
    assert "bpe, asked for 60 pieces" in capsys.readouterr().out
    assert prepare_tokenizer(tmp_path, "spbpe60", 8) == bpe and "cached at" in capsys.readouterr().out


def test_subword_sampling_draws_other_segmentations_of_the_same_text(tokenizer):
    import sentencepiece as spm

    texts = ["a red cat and a purple heart"] * 40
    best = tokenizer(texts, context_length=32)
    assert torch.equal(tokenizer(texts, context_length=32, sampling=0.0), best)
    spm.set_random_generator_seed(3)
    sampled = tokenizer(texts, context_length=32, sampling=0.1)
    assert len({tuple(row) for row in sampled.tolist()}) > 1  # the segmentation varies from row to row
    assert tokenizer.decode(sampled) == tokenizer.decode(best)  # the text never does
    assert all(row.count(EOS_ID) == 1 for row in sampled.tolist())
    spm.set_random_generator_seed(3)
    assert torch.equal(tokenizer(texts, context_length=32, sampling=0.1), sampled)  # seeded: the same draws
    assert not torch.equal(tokenizer(texts, context_length=32, sampling=0.1), sampled)  # the next call: new ones
