"""benchmarks/name_errors.py: name classes mapped to categories through shared image files,
per-category accuracy and seed agreement, on constructed folders and hits (no model)."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "name_errors.py"
spec = importlib.util.spec_from_file_location("name_errors", SCRIPT)
name_errors = importlib.util.module_from_spec(spec)
spec.loader.exec_module(name_errors)


def make_zeroshot(root: Path, names: dict[str, tuple[str, list[str]]]) -> Path:
    """names: class name -> (category, image files); folders as the emoji builder writes them."""
    categories = sorted({c for c, _ in names.values()})
    for level, classes in (("name", list(names)), ("category", categories)):
        (root / level).mkdir(parents=True)
        (root / level / "classnames.txt").write_text("\n".join(classes) + "\n")
    for i, (name, (category, files)) in enumerate(names.items()):
        for f in files:
            for level, index in (("name", i), ("category", categories.index(category))):
                folder = root / level / f"{index:05d}"
                folder.mkdir(exist_ok=True)
                (folder / f).write_bytes(b"")
    return root


def test_each_name_gets_the_category_of_its_images(tmp_path):
    zs = make_zeroshot(tmp_path, {"flag: France": ("flags", ["1f1eb.png"]), "grinning face": ("smileys", ["1f600.png"]),
                                  "flag: Peru": ("flags", ["1f1f5.png", "1f1f5-b.png"])})
    names, of = name_errors.name_categories(zs)
    assert names == ["flag: France", "grinning face", "flag: Peru"] and of == ["flags", "smileys", "flags"]


def test_a_name_whose_images_span_two_categories_is_refused(tmp_path):
    zs = make_zeroshot(tmp_path, {"a": ("x", ["1.png"]), "b": ("y", ["2.png", "3.png"])})
    (zs / "name" / "00001" / "3.png").rename(zs / "name" / "00000" / "3.png")  # "a": one image in x, one in y
    with pytest.raises(SystemExit, match="categories"):
        name_errors.name_categories(zs)


def test_per_category_accuracy_and_agreement_within_and_between_variants():
    of = ["flags", "flags", "other", "other"]
    hits = {"a-seed0": [1, 1, 0, 0], "a-seed1": [1, 0, 1, 0], "b-seed0": [0, 0, 1, 1]}
    s = name_errors.summarize(hits, of)
    assert s["per_run"]["a-seed0"] == {"flags": 1.0, "other": 0.0, "all": 0.5, "all except flags": 0.0}
    assert s["per_variant"]["a"]["flags"] == pytest.approx(0.75) and s["per_variant"]["b"]["other"] == 1.0
    assert s["agreement"]["a vs a"] == {"mean": pytest.approx(1 / 3), "pairs": 1}  # {0,1} and {0,2}
    assert s["agreement"]["a vs b"]["pairs"] == 2
    assert s["agreement"]["a vs b"]["mean"] == pytest.approx((0 + 1 / 3) / 2)  # {0,1}|{2,3}; {0,2}|{2,3}
    assert "b vs b" not in s["agreement"]  # one seed: no pair
    text = name_errors.tables(s)
    assert "| flags | 2 | 75.0 | 0.0 |" in text and "| **all except flags** (mean over names) | 2 | 25.0 | 100.0 |" in text and "| a vs b | 2 | 0.17 |" in text
