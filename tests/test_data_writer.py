"""Writing shards: what goes in comes back out, keys are unique and stable, builds are atomic."""
import io
import json
import tarfile

import pytest
from PIL import Image

from data_pipelines.samples import parse_sample
from data_pipelines.shards import read_shard, resolve_shards
from data_pipelines.skips import SkipCounter
from data_pipelines.testing import fake_records, jpeg_bytes, png_bytes, solid_image
from data_pipelines.writer import Record, ShardSetWriter, sanitize_key, write_shards


def read_all(shard_dir):
    skips = SkipCounter()
    raws = [raw for url in resolve_shards(shard_dir) for raw in read_shard(url, skips)]
    assert skips.total == 0
    return raws


def test_round_trip_keeps_image_bytes_captions_labels_and_metadata(tmp_path):
    records = fake_records(25, num_classes=3)
    records[0].metadata = {"source": "x", "n": 1}
    summary = write_shards(records, tmp_path / "shards", "fake", maxcount=10)
    assert summary.total == 25 and list(summary.shards.values()) == [10, 10, 5]

    raws = read_all(tmp_path / "shards")
    assert len(raws) == 25
    for record, raw in zip(records, raws):
        assert raw["png"] == record.image  # PNG kept byte for byte
        assert json.loads(raw["captions.json"]) == record.captions
        assert raw["txt"].decode() == record.captions[0]
        assert int(raw["cls"]) == record.label
    assert json.loads(raws[0]["json"]) == {"source": "x", "n": 1}
    assert len({raw["__key__"] for raw in raws}) == 25


def test_sizes_json_is_open_clip_style_with_a_total(tmp_path):
    write_shards(fake_records(12), tmp_path / "s", "fake", maxcount=5)
    sizes = json.loads((tmp_path / "s" / "sizes.json").read_text())
    assert sizes == {"fake-000000.tar": 5, "fake-000001.tar": 5, "fake-000002.tar": 2, "total": 12}


def test_keys_are_sanitised_deduplicated_and_stable(tmp_path):
    image = png_bytes(solid_image(1))
    ids = ["a/b.c d.png", "a/b.c d.png", "a_b_c_d_png", "", "x" * 300]
    records = [Record(i, image, ["caption"]) for i in ids]
    write_shards(records, tmp_path / "one", "k")
    write_shards(records, tmp_path / "two", "k")
    keys = [raw["__key__"] for raw in read_all(tmp_path / "one")]
    assert keys == [raw["__key__"] for raw in read_all(tmp_path / "two")]
    assert len(set(keys)) == len(keys)
    assert keys[:3] == ["a_b_c_d_png", "a_b_c_d_png_1", "a_b_c_d_png_2"]
    assert all("." not in k and "/" not in k and len(k) <= 80 for k in keys)
    assert sanitize_key("x" * 300) != sanitize_key("x" * 299)  # long ids keep a hash of the full id


def test_jpeg_and_webp_kept_other_formats_reencoded_as_png(tmp_path):
    bmp = io.BytesIO()
    solid_image(2).save(bmp, format="BMP")
    webp = io.BytesIO()
    solid_image(3).save(webp, format="WEBP")
    records = [Record("jpg", jpeg_bytes(solid_image(1)), ["a"]), Record("bmp", bmp.getvalue(), ["b"]),
               Record("webp", webp.getvalue(), ["c"]), Record("pil", solid_image(4), ["d"])]
    write_shards(records, tmp_path / "s", "f")
    raws = {raw["__key__"]: raw for raw in read_all(tmp_path / "s")}
    assert raws["jpg"]["jpg"] == records[0].image
    assert raws["webp"]["webp"] == records[2].image
    assert Image.open(io.BytesIO(raws["bmp"]["png"])).format == "PNG"
    assert Image.open(io.BytesIO(raws["pil"]["png"])).getpixel((0, 0)) == solid_image(4).getpixel((0, 0))


def test_bad_inputs_are_skipped_with_reasons(tmp_path):
    good = png_bytes(solid_image(1))
    with ShardSetWriter(tmp_path / "s", "f") as writer:
        writer.write(Record("ok", good, ["fine"]))
        writer.write(Record("broken", b"not an image", ["x"]))
        writer.write(Record("blank", good, ["", "   "]))
        writer.write(Record("labelled", good, [], label=3))  # a label alone is enough
        writer.skip("gone", "missing_image_file", "no such file")
    assert writer.summary.total == 2
    assert dict(writer.summary.skipped) == {"undecodable_image": 1, "no_caption": 1, "missing_image_file": 1}
    skipped = json.loads((tmp_path / "s" / "skipped.json").read_text())
    assert skipped["total"] == 3 and {i["source"] for i in skipped["items"]} == {"broken", "blank", "gone"}
    assert "skipped 3" in str(writer.summary)


def test_string_labels_are_kept_as_text(tmp_path):
    write_shards([Record("a", png_bytes(solid_image(1)), ["c"], label="tabby cat")], tmp_path / "s", "f")
    raw = read_all(tmp_path / "s")[0]
    assert raw["label.txt"] == b"tabby cat" and "cls" not in raw
    assert parse_sample(raw, SkipCounter()).label is None


def test_an_interrupted_build_leaves_nothing_behind(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with ShardSetWriter(tmp_path / "s", "f", maxcount=2) as writer:
            for record in fake_records(5):
                writer.write(record)
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_rebuild_replaces_the_old_shards_completely(tmp_path):
    write_shards(fake_records(9), tmp_path / "s", "f", maxcount=3)
    write_shards(fake_records(4), tmp_path / "s", "f", maxcount=3)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "f-000000.tar", "f-000001.tar", "sizes.json", "skipped.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temp or old folders left


def test_nothing_to_write_is_an_error_not_an_empty_dataset(tmp_path):
    with pytest.raises(ValueError, match="no samples"):
        write_shards([Record("x", b"junk", ["c"])], tmp_path / "s", "f")
    assert not (tmp_path / "s").exists()


def test_shards_are_plain_tar_files_with_webdataset_names(tmp_path):
    write_shards(fake_records(2), tmp_path / "s", "f")
    names = tarfile.open(tmp_path / "s" / "f-000000.tar").getnames()
    assert names[:3] == ["sample_00000_png.captions.json", "sample_00000_png.png", "sample_00000_png.txt"]
