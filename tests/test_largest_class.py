"""benchmarks/largest_class.py: coarse top-1 split into the largest class and the rest."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "largest_class.py"
spec = importlib.util.spec_from_file_location("largest_class", SCRIPT)
largest_class = importlib.util.module_from_spec(spec)
spec.loader.exec_module(largest_class)


def test_split_by_hand():
    rows = [{"name": "a", "images": 2, "top1": 0.5}, {"name": "flags", "images": 6, "top1": 1.0},
            {"name": "b", "images": 2, "top1": 0.0}]
    s = largest_class.split_largest(rows)
    assert s["largest"] == "flags" and s["images"] == 6 and s["largest_top1"] == 1.0
    assert s["others_top1"] == pytest.approx(0.25)  # 1 of 4 other images
    assert s["top1"] == pytest.approx(0.7)  # 7 of 10


def test_seeds_are_averaged_per_variant_and_tabled():
    one = {g: {"largest": "flags", "images": 6, "largest_top1": 1.0, "others_top1": 0.2, "top1": 0.5}
           for g in largest_class.COARSE}
    two = {g: {**one[g], "largest_top1": 0.5, "others_top1": 0.4, "top1": 0.45} for g in largest_class.COARSE}
    summary = largest_class.per_variant({"m-seed0": one, "m-seed1": two})
    assert summary["m"]["subcategory"]["n"] == 2
    assert summary["m"]["category"]["others_top1"] == pytest.approx(0.3)
    assert "| m | 2 | subcategory | 47.5 | 75.0 (flags) | 30.0 |" in largest_class.table(summary)


def test_runs_without_an_export_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        largest_class.main([str(tmp_path), "--data", str(tmp_path)])
