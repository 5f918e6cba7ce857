"""Zero-shot metrics on constructed logits: known answers, ties, few classes, imbalance."""
import csv
import math

import pytest
import torch

from eval.metrics import ClassificationMeter, true_class_rank, write_per_class_csv


def test_rank_of_true_class_is_number_of_classes_scoring_higher():
    logits = torch.tensor([[0.1, 0.9, 0.5], [3.0, 2.0, 1.0]])
    assert true_class_rank(logits, torch.tensor([2, 2])).tolist() == [1, 2]


def test_ties_count_against_the_prediction():
    logits = torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 2.0]])
    assert true_class_rank(logits, torch.tensor([0, 1])).tolist() == [1, 2]


def test_constant_logits_score_zero_not_the_first_class():
    meter = ClassificationMeter(6)
    meter.update(torch.zeros(6, 6), torch.zeros(6, dtype=torch.long))
    result = meter.compute()
    assert result["top1"] == 0.0 and result["top5"] == 0.0


def test_nan_score_for_the_true_class_is_a_miss():
    logits = torch.tensor([[float("nan"), 0.0, 1.0]])
    assert true_class_rank(logits, torch.tensor([0])).item() == 3


def test_top1_and_top5_on_known_ranks():
    # 10 classes; true-class ranks 0, 1, 4, 5, 9 -> top-1 1/5, top-5 3/5
    ranks = [0, 1, 4, 5, 9]
    logits = torch.zeros(len(ranks), 10)
    labels = torch.tensor([3, 3, 7, 0, 9])
    for row, (label, rank) in enumerate(zip(labels.tolist(), ranks)):
        order = [c for c in range(10) if c != label]
        order.insert(rank, label)  # position in descending score order
        for position, c in enumerate(order):
            logits[row, c] = 10.0 - position
    meter = ClassificationMeter(10)
    meter.update(logits[:2], labels[:2])
    meter.update(logits[2:], labels[2:])  # batches accumulate
    result = meter.compute()
    assert result["images"] == 5
    assert result["top1"] == pytest.approx(1 / 5)
    assert result["top5"] == pytest.approx(3 / 5)


def test_top5_is_absent_with_fewer_than_five_classes():
    meter = ClassificationMeter(4)
    meter.update(torch.eye(4), torch.arange(4))
    result = meter.compute()
    assert "top5" not in result
    assert result["top1"] == 1.0
    assert all("top5" not in row for row in result["per_class"])


def test_mean_per_class_recall_weights_classes_equally():
    # class 0: 8 images all right; class 1: 2 images, 1 right -> top-1 9/10, recall (1 + 0.5)/2
    labels = torch.tensor([0] * 8 + [1] * 2)
    logits = torch.zeros(10, 2)
    logits[:8, 0] = 1.0
    logits[8, 1] = 1.0
    logits[9, 0] = 1.0
    meter = ClassificationMeter(2)
    meter.update(logits, labels)
    result = meter.compute()
    assert result["top1"] == pytest.approx(0.9)
    assert result["mean_per_class_recall"] == pytest.approx(0.75)


def test_classes_without_images_are_left_out_of_mean_per_class_recall():
    meter = ClassificationMeter(3)
    meter.update(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), torch.tensor([0, 1]))
    result = meter.compute(["a", "b", "c"])
    assert result["classes_with_images"] == 2
    assert result["mean_per_class_recall"] == pytest.approx(0.5)
    assert result["per_class"][2] == {"class": 2, "name": "c", "images": 0, "top1": None}


def test_labels_outside_the_classes_are_an_error():
    meter = ClassificationMeter(3)
    with pytest.raises(ValueError, match="labels outside"):
        meter.update(torch.zeros(1, 3), torch.tensor([3]))


def test_empty_meter_gives_nan_not_a_crash():
    result = ClassificationMeter(3).compute()
    assert result["images"] == 0 and math.isnan(result["top1"])


def test_per_class_csv_has_one_row_per_class(tmp_path):
    meter = ClassificationMeter(5)
    meter.update(torch.eye(5)[[0, 1, 1]], torch.tensor([0, 1, 2]))
    path = write_per_class_csv(meter.compute(list("abcde"))["per_class"], tmp_path / "per_class.csv")
    rows = list(csv.DictReader(path.open()))
    assert [r["name"] for r in rows] == list("abcde")
    assert rows[2]["images"] == "1" and float(rows[2]["top1"]) == 0.0 and float(rows[2]["top5"]) == 1.0
    assert rows[4]["top1"] == ""
