"""Retrieval recall@k on constructed features where every rank is known."""
import pytest
import torch
import torch.nn.functional as F

from eval.retrieval import image_to_text_ranks, retrieval_recall, text_to_image_ranks


def one_hot(indices, dim):
    return F.one_hot(torch.tensor(indices), dim).float()


def test_perfect_features_give_recall_one_both_ways():
    images = torch.eye(4)
    texts = one_hot([0, 0, 1, 2, 3, 3], 4)  # images 0 and 3 have two captions each
    result = retrieval_recall(images, texts, [0, 0, 1, 2, 3, 3], ks=(1, 5))
    assert result == {"image_to_text_R@1": 1.0, "image_to_text_R@5": 1.0,
                      "text_to_image_R@1": 1.0, "text_to_image_R@5": 1.0}


def test_image_to_text_counts_a_hit_if_any_of_its_captions_ranks():
    images = torch.eye(3)
    # image 0's captions: one points at image 2 (wrong), one at image 0 (right)
    texts = torch.stack([one_hot([2], 3)[0], one_hot([0], 3)[0], one_hot([1], 3)[0], one_hot([2], 3)[0]])
    ranks = image_to_text_ranks(images, texts, torch.tensor([0, 0, 1, 2]))
    assert ranks.tolist() == [0, 0, 1]  # image 2 ties with caption 0 (of image 0): counted against it


def test_known_ranks_give_known_recall():
    # Captions that prefer the right image at rank 0, 1 and 2 (scores built by hand).
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 0.5, 0.2],   # caption of image 0: rank 0
                          [0.9, 0.5, 0.1],   # caption of image 1: rank 1
                          [0.9, 0.8, 0.1]])  # caption of image 2: rank 2
    text_image = torch.tensor([0, 1, 2])
    assert text_to_image_ranks(images, texts, text_image).tolist() == [0, 1, 2]
    result = retrieval_recall(images, texts, text_image, ks=(1, 2, 3))
    assert result["text_to_image_R@1"] == pytest.approx(1 / 3)
    assert result["text_to_image_R@2"] == pytest.approx(2 / 3)
    assert result["text_to_image_R@3"] == pytest.approx(1.0)


def test_chunked_ranks_equal_unchunked_ranks():
    torch.manual_seed(0)
    images = F.normalize(torch.randn(50, 8), dim=-1)
    text_image = torch.randint(0, 50, (120,))
    texts = F.normalize(images[text_image] + 0.8 * torch.randn(120, 8), dim=-1)
    full = retrieval_recall(images, texts, text_image, max_scores=1 << 30)
    tiny = retrieval_recall(images, texts, text_image, max_scores=7)  # one row per chunk
    assert full == tiny
    assert 0.0 < full["text_to_image_R@1"] < 1.0


def test_images_without_captions_are_not_queries():
    images = torch.eye(3)
    texts = one_hot([0, 1], 3)
    assert image_to_text_ranks(images, texts, torch.tensor([0, 1])).tolist() == [0, 0, -1]
    assert retrieval_recall(images, texts, [0, 1], ks=(1,))["image_to_text_R@1"] == 1.0


def test_caption_index_outside_the_images_is_an_error():
    with pytest.raises(ValueError, match="outside"):
        retrieval_recall(torch.eye(2), torch.eye(2), [0, 2])


# ---- through shards, the loader and a model ---------------------------------------------------


def colour_shards(tmp_path):
    from PIL import Image

    from data_pipelines.testing import png_bytes
    from data_pipelines.writer import Record, write_shards
    from test_eval_zeroshot import COLOURS

    records = [Record(f"img-{name}", png_bytes(Image.new("RGB", (20, 20), rgb)),
                      [f"a {name} square", f"{name} colour"]) for name, rgb in COLOURS.items()]
    write_shards(records, tmp_path / "shards", "colours", maxcount=2)
    return tmp_path / "shards"


def test_each_image_retrieves_its_own_captions_through_shards(tmp_path):
    from data_pipelines import build_eval_loader
    from eval.retrieval import evaluate_retrieval
    from test_eval_zeroshot import ColourModel, colour_tokenizer

    loader = build_eval_loader(str(colour_shards(tmp_path)), 16, batch_size=2)
    result = evaluate_retrieval(ColourModel(), colour_tokenizer,
                                ((b["images"], b["captions"]) for b in loader))
    assert result["counts"] == {"images": 3, "captions": 6}
    assert all(value == 1.0 for value in result["metrics"].values())


def test_retrieval_cli_writes_recall_json(tiny_export, tmp_path, capsys):
    import json

    from data_pipelines.testing import write_fake_shards
    from launch.cli import main as limoe_main

    write_fake_shards(tmp_path / "shards", num_samples=12, per_shard=5)
    out = tmp_path / "retrieval.json"
    assert limoe_main(["eval", "retrieval", "--model", str(tiny_export), "--data", str(tmp_path / "shards"),
                       "--batch-size", "5", "--output", str(out)]) == 0
    assert "image_to_text_R@1" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["counts"] == {"images": 12, "captions": 36}
    assert set(doc["metrics"]) == {f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    assert all(0.0 <= v <= 1.0 for v in doc["metrics"].values())
