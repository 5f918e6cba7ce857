"""Reading shards for training and evaluation: coverage, batch counts, determinism, mixing."""
import re
from collections import Counter

import pytest
import torch

from data_pipelines import DataSource, build_eval_loader, build_train_loader, resolve_shards
from data_pipelines.testing import png_bytes, solid_image, write_fake_shards
from data_pipelines.writer import Record, write_shards
from limoe.tokenizer import Tokenizer

IMAGE_SIZE = 16


@pytest.fixture(scope="module")
def tokenizer():
    words = [f"sample {i} colour number {i} picture {i} alpha {i} beta {i}" for i in range(200)]
    return Tokenizer.train(words, vocab_size=80, context_length=12)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """42 captioned samples in 6 shards of 7 (uneven over 2 ranks x 2 workers)."""
    return write_fake_shards(tmp_path_factory.mktemp("data") / "shards", num_samples=42, per_shard=7, num_classes=5)


def single_caption_shards(folder, word, n, per_shard):
    records = [Record(f"{word}{i}", png_bytes(solid_image(i)), [f"{word} {i}"]) for i in range(n)]
    summary = write_shards(records, folder, word, maxcount=per_shard)
    return [str(folder / name) for name in summary.shards]


def caption_numbers(tokenizer, tokens):
    return [int(re.search(r"\d+", text).group()) for text in tokenizer.decode(tokens)]


# ---- shard specs ------------------------------------------------------------------


def test_shards_can_be_a_folder_a_brace_pattern_a_glob_or_a_list(shards):
    folder = shards[0].rsplit("/", 1)[0]
    assert resolve_shards(folder) == shards
    assert resolve_shards(folder + "/fake-{000000..000005}.tar") == shards
    assert resolve_shards(folder + "/fake-*.tar") == shards
    assert resolve_shards(shards[:2]) == shards[:2]
    assert resolve_shards(f"{shards[0]}::{shards[1]}") == shards[:2]
    assert resolve_shards(folder.rsplit("/", 1)[0]) == shards  # a build folder holding shards/


def test_missing_shards_are_named_in_the_error(shards):
    folder = shards[0].rsplit("/", 1)[0]
    with pytest.raises(FileNotFoundError, match=r"4 of 10 shard\(s\) not found: .*fake-000006.tar"):
        resolve_shards(folder + "/fake-{000000..000009}.tar")
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        resolve_shards(folder + "/../..")


# ---- evaluation -------------------------------------------------------------------


def test_eval_over_2_ranks_and_2_workers_sees_every_sample_exactly_once(shards):
    keys, labels = [], []
    for rank in range(2):
        loader = build_eval_loader(shards, IMAGE_SIZE, batch_size=4, rank=rank, world_size=2, num_workers=2)
        for batch in loader:
            assert batch["images"].shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
            assert len(batch["keys"]) == len(batch["captions"]) == len(batch["labels"]) == len(batch["images"])
            keys += batch["keys"]
            labels += batch["labels"].tolist()
        assert loader.skips.total == 0
    assert len(keys) == 42 and len(set(keys)) == 42
    assert sorted(labels) == sorted(i % 5 for i in range(42))


def test_eval_batches_carry_captions_labels_and_first_caption_tokens(shards, tokenizer):
    loader = build_eval_loader(shards[:1], IMAGE_SIZE, batch_size=5, tokenizer=tokenizer)
    batches = list(loader)
    assert [len(b["keys"]) for b in batches] == [5, 2]  # the last batch is short, not dropped
    first = batches[0]
    assert first["captions"][0] == ["sample 0", "colour number 0", "picture 0"]
    assert first["labels"].tolist() == [0, 1, 2, 3, 4]
    assert tokenizer.decode(first["tokens"][0]) == "sample 0"
    assert loader.num_samples == 7 and len(loader) == 2


def test_eval_order_is_fixed(shards):
    def keys():
        return [k for b in build_eval_loader(shards, IMAGE_SIZE, 8, num_workers=2) for k in b["keys"]]

    assert keys() == keys()


# ---- training ---------------------------------------------------------------------


def test_resampled_training_yields_exactly_batches_per_epoch(shards, tokenizer):
    for num_workers in (0, 2):
        loader = build_train_loader(shards, tokenizer, IMAGE_SIZE, batch_size=4, batches_per_epoch=5,
                                    num_workers=num_workers, seed=0)
        batches = list(loader)
        assert len(batches) == len(loader) == 5
        images, tokens = batches[0]
        assert images.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) and images.dtype == torch.float32
        assert tokens.shape == (4, 12) and tokens.dtype == torch.long


def test_same_seed_and_epoch_give_the_same_batches(shards, tokenizer):
    def run(seed=0, epoch=0, rank=0, num_workers=0):
        loader = build_train_loader(shards, tokenizer, IMAGE_SIZE, batch_size=4, batches_per_epoch=4,
                                    rank=rank, world_size=2, num_workers=num_workers, seed=seed, epoch=epoch)
        return list(loader)

    def same(a, b):
        return all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))

    assert same(run(num_workers=2), run(num_workers=2))  # images too: augmentation is seeded
    first = run()
    assert same(first, run())
    assert not same(first, run(seed=1))
    assert not same(first, run(epoch=1))
    assert not same(first, run(rank=1))


def test_each_pass_advances_the_epoch_and_set_epoch_resumes(shards, tokenizer):
    loader = build_train_loader(shards, tokenizer, IMAGE_SIZE, batch_size=4, batches_per_epoch=3, seed=3)
    epoch0, epoch1 = list(loader), list(loader)
    assert loader.epoch == 2
    assert not torch.equal(epoch0[0][1], epoch1[0][1])
    loader.set_epoch(1)  # e.g. resuming a run at epoch 1
    assert all(torch.equal(a[1], b[1]) for a, b in zip(list(loader), epoch1))


def test_captions_are_drawn_from_each_samples_caption_list(shards, tokenizer):
    loader = build_train_loader(shards, tokenizer, IMAGE_SIZE, batch_size=6, batches_per_epoch=10, seed=0)
    texts = [t for _, tokens in loader for t in tokenizer.decode(tokens)]
    kinds = Counter(t.split()[0] for t in texts)
    assert set(kinds) == {"sample", "colour", "picture"}  # not always the first caption


def test_a_batch_avoids_captions_another_sample_already_has(tmp_path, tokenizer):
    # Every sample: its own caption, plus one all samples share (a class sentence).
    records = [Record(f"s{i}", png_bytes(solid_image(i)), [f"alpha {i}", "beta beta"]) for i in range(24)]
    shards = [str(tmp_path / "s" / name) for name in write_shards(records, tmp_path / "s", "s", maxcount=8).shards]
    per_batch = []
    for epoch in range(4):  # plain epochs: no sample twice in a batch (resampling may draw one twice)
        loader = build_train_loader(shards, tokenizer, IMAGE_SIZE, batch_size=8, batches_per_epoch=None,
                                    resampled=False, seed=0, epoch=epoch)
        per_batch += [tokenizer.decode(tokens) for _, tokens in loader]
    assert len(per_batch) == 12
    shared = [sum(t == "beta beta" for t in texts) for texts in per_batch]
    assert max(shared) == 1 and sum(shared) >= 9  # once per batch at most (a uniform choice: ~4 times)
    assert all(len(set(texts)) == len(texts) for texts in per_batch)
    # A sample with nothing else to offer keeps its caption, duplicate or not.
    only_shared = [Record(f"o{i}", png_bytes(solid_image(i)), ["beta beta"]) for i in range(8)]
    shards = [str(tmp_path / "o" / name) for name in write_shards(only_shared, tmp_path / "o", "o").shards]
    loader = build_train_loader(shards, tokenizer, IMAGE_SIZE, batch_size=4, batches_per_epoch=2, seed=0)
    assert {t for _, tokens in loader for t in tokenizer.decode(tokens)} == {"beta beta"}


def test_caption_keys_say_which_samples_have_each_drawn_caption(tmp_path, tokenizer):
    from data_pipelines.loader import caption_key
    from limoe.losses import positives_mask

    # Samples 0-5: own caption plus "beta beta" (a class sentence); 6-11: own caption only.
    records = [Record(f"s{i}", png_bytes(solid_image(i)), [f"alpha {i}"] + ["beta beta"] * (i < 6))
               for i in range(12)]
    shards = [str(tmp_path / name) for name in write_shards(records, tmp_path, "s", maxcount=6).shards]
    loader = build_train_loader(shards, tokenizer, IMAGE_SIZE, batch_size=12, batches_per_epoch=None,
                                resampled=False, seed=0, caption_positives=True)
    (images, tokens, keys), = list(loader)
    texts = tokenizer.decode(tokens)
    assert keys.shape == (12, 16) and keys.dtype == torch.long
    positives = positives_mask(keys, keys[:, 0])
    assert positives.diagonal().all()  # every image has the caption drawn for it
    sample = [next(n for n in range(12) if caption_key(f"alpha {n}") in row.tolist()) for row in keys]
    assert sorted(sample) == list(range(12))  # each row's keys name its sample's own caption
    has_beta = [n < 6 for n in sample]
    beta = [j for j, t in enumerate(texts) if t == "beta beta"]
    assert len(beta) == 1  # the unique-caption rule still draws the shared caption once at most
    for i in range(12):
        for j in range(12):
            # "alpha N" describes only its own image; "beta beta" every image that has it.
            want = (i == j) or (j in beta and has_beta[i])
            assert positives[i, j].item() == want, (i, j, texts[i], texts[j])
    # The images are the ones a plain loader gives: the keys ride along, nothing else changes.
    plain = build_train_loader(shards, tokenizer, IMAGE_SIZE, batch_size=12, batches_per_epoch=None,
                               resampled=False, seed=0)
    (plain_images, plain_tokens), = list(plain)
    assert torch.equal(plain_images, images) and torch.equal(plain_tokens, tokens)


def test_subword_sampling_changes_the_pieces_not_the_captions(shards, tokenizer):
    roomy = Tokenizer(tokenizer.model_proto, context_length=48)  # sampled pieces are more: none cut off

    def batches(sampling, workers):
        loader = build_train_loader(shards, roomy, IMAGE_SIZE, batch_size=6, batches_per_epoch=5, seed=0,
                                    num_workers=workers, subword_sampling=sampling)
        return [tokens for _, tokens in loader]

    for workers in (0, 1):
        plain, sampled = batches(0.0, workers), batches(0.05, workers)
        assert [roomy.decode(t) for t in sampled] == [roomy.decode(t) for t in plain]
        assert any(not torch.equal(a, b) for a, b in zip(sampled, plain))
    # In the training process the draws repeat with the seed (SentencePiece's generator, seeded per pass).
    assert all(torch.equal(a, b) for a, b in zip(batches(0.05, 0), batches(0.05, 0)))


def test_plain_epochs_read_every_sample_once_and_drop_short_batches(tmp_path, tokenizer):
    shards = single_caption_shards(tmp_path / "s", "sample", 40, per_shard=10)
    seen = []
    for rank in range(2):
        loader = build_train_loader(shards, tokenizer, IMAGE_SIZE, batch_size=4, batches_per_epoch=None,
                                    rank=rank, world_size=2, num_workers=2, resampled=False, seed=0)
        batches = list(loader)
        assert len(batches) == 4  # each worker: 10 samples -> 2 full batches, 2 dropped
        seen += [n for _, tokens in batches for n in caption_numbers(tokenizer, tokens)]
    assert len(seen) == len(set(seen)) == 32


def test_sources_are_mixed_by_weight(tmp_path, tokenizer):
    alpha = single_caption_shards(tmp_path / "a", "alpha", 30, per_shard=10)
    beta = single_caption_shards(tmp_path / "b", "beta", 30, per_shard=10)
    loader = build_train_loader([DataSource(alpha, weight=3.0), DataSource(beta, weight=1.0)], tokenizer,
                                IMAGE_SIZE, batch_size=10, batches_per_epoch=40, seed=0, shuffle_buffer=20)
    words = Counter(t.split()[0] for _, tokens in loader for t in tokenizer.decode(tokens))
    assert set(words) == {"alpha", "beta"}
    assert 0.68 < words["alpha"] / 400 < 0.82


def test_resampling_needs_a_batch_count(shards, tokenizer):
    with pytest.raises(ValueError, match="batches_per_epoch"):
        build_train_loader(shards, tokenizer, IMAGE_SIZE, batch_size=4, batches_per_epoch=None)
