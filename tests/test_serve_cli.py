"""`limoe embed` and `limoe serve` from the command line."""
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

import limoe
from launch.cli import main

from test_embedder import png_bytes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def embedder(shared_tiny_export):
    return limoe.Embedder(shared_tiny_export)


@pytest.fixture
def image_files(tmp_path):
    paths = []
    for i, color in enumerate([(255, 0, 0), (0, 0, 255)]):
        path = tmp_path / f"{i}.png"
        path.write_bytes(png_bytes(color))
        paths.append(str(path))
    return paths


def test_embed_prints_json_with_the_embedder_vectors(shared_tiny_export, embedder, image_files, capsys):
    long_text = " ".join(["purple heart"] * 30)
    assert main(["embed", "--model", str(shared_tiny_export), "--text", "red heart", long_text,
                 "--image", *image_files]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["embedding_dim"] == 16
    assert [t["truncated"] for t in doc["texts"]] == [False, True]
    np.testing.assert_allclose(np.float32([t["embedding"] for t in doc["texts"]]),
                               embedder.embed_texts(["red heart", long_text]), atol=1e-6)
    np.testing.assert_allclose(np.float32([i["embedding"] for i in doc["images"]]),
                               embedder.embed_images(image_files), atol=1e-6)


def test_embed_refuses_a_too_elongated_image_with_a_one_line_error(shared_tiny_export, tmp_path, capsys):
    from test_embedder import thin_png

    thin = tmp_path / "thin.png"
    thin.write_bytes(thin_png(1, 300_000))  # 661 bytes; resizing it took 4-7 s and 1.7 GB
    assert main(["embed", "--model", str(shared_tiny_export), "--image", str(thin)]) == 1
    err = capsys.readouterr().err
    assert err == "error: image 0: image is 1x300000, an aspect ratio of 300,000:1, more than the limit of 100:1\n"


def test_serve_image_limits_reach_the_settings(monkeypatch):
    import limoe.serve

    seen = {}
    monkeypatch.setattr(limoe.serve, "run_server", lambda model, **kw: seen.update(kw["settings"].__dict__))
    assert main(["serve", "--model", "m", "--max-image-pixels", "1000", "--max-image-aspect-ratio", "4.5"]) == 0
    assert seen["max_image_pixels"] == 1000 and seen["max_image_aspect_ratio"] == 4.5
    with pytest.raises(SystemExit):
        main(["serve", "--model", "m", "--max-image-aspect-ratio", "0.5"])  # below 1 means nothing fits


def test_embed_writes_npy_rows_texts_then_images(shared_tiny_export, embedder, image_files, tmp_path):
    out = tmp_path / "out" / "z.npy"
    assert main(["embed", "--model", str(shared_tiny_export), "--image", image_files[0], "--text", "cat",
                 "dog", "-o", str(out)]) == 0
    rows = np.load(out, allow_pickle=False)
    assert rows.dtype == np.float32 and rows.shape == (3, 16)
    np.testing.assert_allclose(rows[:2], embedder.embed_texts(["cat", "dog"]), atol=1e-6)
    np.testing.assert_allclose(rows[2:], embedder.embed_images(image_files[:1]), atol=1e-6)
    assert [p.name for p in out.parent.iterdir()] == ["z.npy"]  # no temp files left behind


def test_embed_with_labels_ranks_them_per_image(shared_tiny_export, embedder, image_files, tmp_path):
    out = tmp_path / "c.json"
    labels = ["heart", "car", "moon"]
    assert main(["embed", "--model", str(shared_tiny_export), "--image", *image_files, "--labels", *labels,
                 "--templates", "a {} emoji", "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    probs = embedder.classify(image_files, labels, ["a {} emoji"])
    for row, result in zip(probs, doc["classification"]):
        assert result["label"] == labels[row.argmax()]
        assert [r["label"] for r in result["ranking"]] == [labels[j] for j in np.argsort(-row)]


@pytest.mark.parametrize("args, message", [
    ([], "nothing to embed"),
    (["--text", "a", "--labels", "x"], "give --image too"),
    (["--text", "a", "-o", "z.csv"], ".json or .npy"),
    (["--image", "missing.png"], "cannot read"),
])
def test_embed_usage_errors_exit_nonzero_with_a_message(shared_tiny_export, args, message, capsys):
    assert main(["embed", "--model", str(shared_tiny_export), *args]) != 0
    assert message in capsys.readouterr().err


def test_embed_on_a_folder_that_is_not_an_export(tmp_path, capsys):
    assert main(["embed", "--model", str(tmp_path), "--text", "a"]) == 1
    assert "config.json" in capsys.readouterr().err


def test_serve_command_serves_until_interrupted_with_the_key_from_the_environment(shared_tiny_export):
    env = dict(os.environ, LIMOE_API_KEY="from-env")
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "serve", "--model", str(shared_tiny_export),
                             "--port", "0", "--model-name", "tiny"],
                            cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        url = None
        while url is None:
            line = lines.get(timeout=120)
            match = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
            url = match and match.group(1)
        assert httpx.get(url + "/health").json()["model"] == "tiny"
        assert httpx.post(url + "/v1/embeddings", json={"input": "cat"}).status_code == 401
        ok = httpx.post(url + "/v1/embeddings", json={"input": "cat", "model": "tiny"},
                        headers={"Authorization": "Bearer from-env"})
        assert ok.status_code == 200 and len(ok.json()["data"][0]["embedding"]) == 16
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    assert code == 0
