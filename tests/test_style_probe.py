"""benchmarks/style_probe.py: nearest class centroid of one style's image embeddings, scored on another."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "style_probe.py"
spec = importlib.util.spec_from_file_location("style_probe", SCRIPT)
style_probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(style_probe)


def test_nearest_centroid_by_hand_and_an_unseen_class_counts_wrong():
    train_x = torch.tensor([[1.0, 0.0], [0.8, 0.2], [0.0, 1.0]])
    train_y = torch.tensor([0, 0, 1])
    test_x = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.0, 1.0]])
    test_y = torch.tensor([0, 1, 1, 2])  # the third is nearer class 0; class 2 has no training image
    assert style_probe.nearest_centroid_top1(train_x, train_y, test_x, test_y, num_classes=3) == pytest.approx(0.5)


def test_seeds_are_grouped_by_variant():
    per_run = {"a-seed0": {"name": 0.1, "subcategory": 0.2, "category": 0.3},
               "a-seed1": {"name": 0.3, "subcategory": 0.2, "category": 0.5},
               "b-seed0": {"name": 0.2, "subcategory": 0.1, "category": 0.4}}
    s = style_probe.per_variant(per_run)
    assert s["a"]["name"]["mean"] == pytest.approx(0.2) and s["a"]["name"]["n"] == 2
    assert s["b"]["category"]["std"] is None
    assert "| a | 2 | 20.0 ± 14.1 | 20.0 ± 0.0 | 40.0 ± 14.1 |" in style_probe.table(s)


def _style(root: Path, shade: int) -> Path:
    """A zeroshot tree as the emoji builder writes it: 3 classes of 2 images at every granularity."""
    colours = [(shade, 0, 0), (0, shade, 0), (0, 0, shade)]
    for level in style_probe.GRANULARITIES:
        folder = root / "zeroshot" / level
        folder.mkdir(parents=True)
        (folder / "classnames.txt").write_text("red\ngreen\nblue\n")
        for i, colour in enumerate(colours):
            (folder / f"{i:05d}").mkdir()
            for j in range(2):
                Image.new("RGB", (16, 16), tuple(min(255, c + 20 * j) for c in colour)).save(folder / f"{i:05d}" / f"{j}.png")
    return root


def test_the_script_scores_every_granularity_of_a_run(tmp_path, shared_tiny_export):
    run = tmp_path / "runs" / "tiny-seed0"
    shutil.copytree(shared_tiny_export, run / "export")
    out = tmp_path / "probe.json"
    assert style_probe.main([str(run), "--data", str(_style(tmp_path / "twitter", 200)),
                             "--train-style", str(_style(tmp_path / "google", 255)), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    scores = result["per_run"]["tiny-seed0"]
    assert set(scores) == set(style_probe.GRANULARITIES) and all(0.0 <= v <= 1.0 for v in scores.values())
    assert result["per_variant"]["tiny"]["name"]["n"] == 1


def test_each_distinct_image_is_embedded_once_for_all_granularities(tmp_path, shared_tiny_export):
    import limoe

    root = _style(tmp_path / "style", 255)
    for level in style_probe.GRANULARITIES:  # an unreadable file, in every granularity's first class
        (root / "zeroshot" / level / "00000" / "broken.png").write_bytes(b"not a png")
    model, preprocess, _ = limoe.load(shared_tiny_export)
    embedded = []
    encode = model.encode_image
    model.encode_image = lambda images, **kw: embedded.append(len(images)) or encode(images, **kw)
    shared = style_probe.embed_style(model, preprocess, root)
    assert sum(embedded) == 6  # 3 classes x 2 images, the same files at every granularity
    for level in style_probe.GRANULARITIES:
        want_x, want_y, want_names = style_probe.embed_folder(model, preprocess, root / "zeroshot" / level)
        got_x, got_y, got_names = shared[level]
        assert got_names == want_names and torch.equal(got_y, want_y) and len(got_y) == 6
        torch.testing.assert_close(got_x, want_x)


def test_a_run_without_an_export_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        style_probe.main([str(tmp_path), "--data", str(tmp_path), "--train-style", str(tmp_path)])
