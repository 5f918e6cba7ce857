"""benchmarks/gate_weights.py: the top-1 router probability (the raw combine weight) of trained runs."""
import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from PIL import Image

import limoe
from limoe.moe import LIMoEGate

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gate_weights.py"
spec = importlib.util.spec_from_file_location("gate_weights", SCRIPT)
gate_weights = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gate_weights)


def test_gate_stats_by_hand():
    probs = [torch.tensor([[0.5, 0.5]]), torch.tensor([[1.0, 1e-12], [0.8, 0.2]])]
    s = gate_weights.gate_stats([p.log() for p in probs], noise_std=0.0)
    assert s["top1_mean"] == pytest.approx((0.5 + 1.0 + 0.8) / 3)
    assert s["top1_median"] == pytest.approx(0.8)
    h = lambda p: -sum(x * math.log(x) for x in p if x)  # noqa: E731
    assert s["entropy"] == pytest.approx((h([0.5, 0.5]) + 0 + h([0.8, 0.2])) / 3)
    assert (s["tokens"], s["experts"]) == (3, 2) and s["noise_changes_top1"] == 0.0


def test_noise_changes_close_first_choices_and_not_clear_ones():
    close = torch.tensor([[0.01, 0.0]] * 2000)  # a gap of 0.01 against sigma 0.5
    clear = torch.tensor([[20.0, 0.0]] * 2000)
    assert 0.4 < gate_weights.gate_stats([close], noise_std=1.0)["noise_changes_top1"] < 0.6
    assert gate_weights.gate_stats([clear], noise_std=1.0)["noise_changes_top1"] == 0.0


def _folder(root: Path) -> Path:
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0)]):
        (root / f"{i:05d}").mkdir(parents=True)
        Image.new("RGB", (16, 16), colour).save(root / f"{i:05d}" / "a.png")
    (root / "classnames.txt").write_text("red\ngreen\n")
    return root


def test_the_script_measures_both_modalities_of_a_run_and_matches_the_models_routing(tmp_path, shared_tiny_export):
    run = tmp_path / "runs" / "tiny-seed0"
    shutil.copytree(shared_tiny_export, run / "export")
    out = tmp_path / "gates.json"
    assert gate_weights.main([str(run), "--data", str(_folder(tmp_path / "images")), "--out", str(out)]) == 0
    result = json.loads(out.read_text())["per_run"]["tiny-seed0"]
    for m in ("image", "text"):
        s = result[m]
        assert s["tokens"] > 0 and 1 / s["experts"] <= s["top1_mean"] <= 1
        assert 0 <= s["entropy"] <= math.log(s["experts"]) + 1e-6 and 0 <= s["noise_changes_top1"] <= 1

    # The hook's logits are the gate's own: its eval-mode routes take their argmax.
    model, _, tokenizer = limoe.load(run / "export")
    seen, handles = gate_weights.capture_router_logits(model)
    chosen = []
    for gate in (mod for mod in model.modules() if isinstance(mod, LIMoEGate)):
        handles.append(gate.register_forward_hook(lambda g, a, out: chosen.append(out[0].expert[0])))
    model.eval()
    with torch.no_grad():
        model.encode_text(tokenizer(["red", "green"]))
    text_routes = [e[e >= 0] for e in chosen]
    assert [p.argmax(-1).tolist() for p in seen["text"]] == [e.tolist() for e in text_routes]


def test_a_dense_run_is_refused(tmp_path, tiny_tokenizer):
    run = tmp_path / "runs" / "dense-seed0"
    limoe.save(make_tiny_model(tiny_tokenizer, name="limoe-nano-dense"), tiny_tokenizer, run / "export")
    with pytest.raises(SystemExit, match="no MoE layers"):
        gate_weights.main([str(run), "--data", str(_folder(tmp_path / "images")), "--out", str(tmp_path / "g.json")])
