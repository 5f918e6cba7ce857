"""Corrupt data never stops a run: bad samples and broken shards are skipped and counted per reason.

The shard set built here:
  good-000000.tar     6 good samples + a corrupt JPEG, a sample without captions,
                      a sample whose captions are all blank
  cut-000000.tar      6 good samples, cut inside the first file of sample 3 (3 survive)
  cut-000001.tar      6 good samples, cut inside the image of sample 2: samples 0-1 survive,
                      sample 2 has only its captions (reported as truncated_sample)
  cut-000002.tar      6 good samples, cut inside the header of sample 4: tarfile sees a clean
                      end, sizes.json says 6 were written (4 survive)
  junk-000000.tar     not a tar file at all
"""
import json
import tarfile

import pytest
import webdataset as wds

from data_pipelines import build_eval_loader, build_train_loader
from data_pipelines.testing import jpeg_bytes, png_bytes, solid_image

GOOD_SAMPLES = 6 + 3 + 2 + 4
EXPECTED_SKIPS = {
    "undecodable_image": 1,
    "missing_caption": 1,
    "empty_caption": 1,
    "truncated_tar": 3,
    "truncated_sample": 1,
    "unreadable_shard": 1,
    "missing_samples": 3 + 3 + 2,  # what sizes.json lists beyond the samples each cut shard still holds
}


def good_sample(name, i):
    return {"__key__": f"{name}{i}", "png": png_bytes(solid_image(i)),
            "captions.json": json.dumps([f"sample {i}"]).encode(), "txt": f"sample {i}".encode()}


def write_tar(path, samples):
    with wds.TarWriter(str(path), mtime=0) as writer:
        for sample in samples:
            writer.write(sample)


def cut(path, member_name, into_data: bool):
    """Truncate a tar a few bytes into the data (or the header) of one member."""
    with tarfile.open(path) as tar:
        member = tar.getmember(member_name)
    offset = member.offset_data + 5 if into_data else member.offset + 100
    with open(path, "r+b") as f:
        f.truncate(offset)


@pytest.fixture(scope="module")
def broken_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("broken")
    write_tar(folder / "good-000000.tar", [
        *[good_sample("g", i) for i in range(3)],
        {"__key__": "badjpeg", "jpg": jpeg_bytes(solid_image(9))[:40] + b"\x00" * 50,
         "captions.json": b'["a broken jpeg"]'},
        {"__key__": "nocaption", "png": png_bytes(solid_image(10))},
        {"__key__": "blankcaption", "png": png_bytes(solid_image(11)), "captions.json": b'["", "  "]'},
        *[good_sample("g", i) for i in range(3, 6)],
    ])
    for n in range(3):
        write_tar(folder / f"cut-00000{n}.tar", [good_sample(f"c{n}_", i) for i in range(6)])
    cut(folder / "cut-000000.tar", "c0_3.captions.json", into_data=True)
    cut(folder / "cut-000001.tar", "c1_2.png", into_data=True)
    cut(folder / "cut-000002.tar", "c2_4.captions.json", into_data=False)
    (folder / "sizes.json").write_text(json.dumps({f"cut-00000{n}.tar": 6 for n in range(3)}))
    (folder / "junk-000000.tar").write_bytes(b"this is not a tar file" * 100)
    return sorted(str(p) for p in folder.glob("*.tar"))


CAPTION_SKIPS = {"missing_caption": 1, "empty_caption": 1}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_retrieval_eval_reads_to_the_end_and_counts_each_reason(broken_shards, num_workers):
    loader = build_eval_loader(broken_shards, 16, batch_size=4, num_workers=num_workers, require_captions=True)
    keys = [k for batch in loader for k in batch["keys"]]
    assert len(keys) == GOOD_SAMPLES == len(set(keys))
    assert {"c0_0", "c0_2", "c1_1", "c2_3"} <= set(keys) and not {"c0_3", "c1_2", "c2_4"} & set(keys)
    assert dict(loader.skips.counts) == EXPECTED_SKIPS
    metrics = loader.skips.as_metrics()
    assert metrics["data/skipped_total"] == sum(EXPECTED_SKIPS.values())


def test_classification_eval_keeps_samples_without_captions(broken_shards):
    loader = build_eval_loader(broken_shards, 16, batch_size=4)
    batches = list(loader)
    keys = [k for batch in batches for k in batch["keys"]]
    assert len(keys) == GOOD_SAMPLES + 2 and {"nocaption", "blankcaption"} <= set(keys)
    captions = {k: c for batch in batches for k, c in zip(batch["keys"], batch["captions"])}
    assert captions["nocaption"] == [] and captions["g0"] == ["sample 0"]
    assert loader.skips.counts == {r: n for r, n in EXPECTED_SKIPS.items() if r not in CAPTION_SKIPS}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_training_over_broken_shards_keeps_going_and_counts(broken_shards, tiny_tokenizer, num_workers):
    loader = build_train_loader(broken_shards, tiny_tokenizer, 16, batch_size=3, batches_per_epoch=None,
                                num_workers=num_workers, resampled=False)
    batches = list(loader)
    assert all(images.shape[0] == 3 for images, _ in batches)
    if num_workers == 0:
        assert len(batches) == 5  # all 15 good samples in one plain epoch
    else:
        assert 4 <= len(batches) <= 5  # each worker drops its own short last batch
    assert dict(loader.skips.counts) == EXPECTED_SKIPS


def test_resampled_training_over_broken_shards_yields_every_batch(broken_shards, tiny_tokenizer):
    loader = build_train_loader(broken_shards, tiny_tokenizer, 16, batch_size=4, batches_per_epoch=20, seed=1)
    assert len(list(loader)) == 20
    assert set(loader.skips.counts) <= set(EXPECTED_SKIPS) and loader.skips.total > 0


def test_a_tar_with_no_members_is_truncated_and_its_listed_samples_missing(tmp_path):
    from data_pipelines.shards import read_shard
    from data_pipelines.skips import SkipCounter

    tarfile.open(tmp_path / "e-000000.tar", "w").close()
    (tmp_path / "sizes.json").write_text(json.dumps({"e-000000.tar": 161, "total": 161}))
    skips = SkipCounter()
    assert list(read_shard(str(tmp_path / "e-000000.tar"), skips)) == []
    assert dict(skips.counts) == {"truncated_tar": 1, "missing_samples": 161}


def test_only_unreadable_data_is_an_error_not_a_hang(broken_shards, tiny_tokenizer):
    junk = [s for s in broken_shards if "junk" in s]
    loader = build_train_loader(junk, tiny_tokenizer, 16, batch_size=4, batches_per_epoch=2)
    with pytest.raises(RuntimeError, match="no readable samples"):
        list(loader)


def test_skips_are_logged_as_warnings(broken_shards, caplog):
    with caplog.at_level("WARNING", logger="limoe.data"):
        list(build_eval_loader(broken_shards, 16, batch_size=4, require_captions=True))
    text = caplog.text
    assert "skipped (undecodable_image) badjpeg" in text
    assert "skipped (truncated_tar)" in text and "data pass skipped 16" in text
