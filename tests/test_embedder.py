"""limoe.Embedder: the Python embedding and zero-shot classification API over an export."""
import io
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import limoe
from limoe.embedder import ImageError, average_prompt_embeddings, label_probabilities, load_image

from conftest import tiny_texts


def png_bytes(color=(200, 30, 30), size=(20, 12), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height (CRC fixed): a decompression-bomb stand-in."""
    data = bytearray(png_bytes(size=(1, 1)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def random_images(n, seed=0, size=20):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def embedder(shared_tiny_export):
    return limoe.Embedder(shared_tiny_export)


def test_text_embeddings_are_unit_float32_rows_equal_to_the_model(embedder):
    texts = tiny_texts(5, seed=2)
    z = embedder.embed_texts(texts)
    assert z.dtype == np.float32 and z.shape == (5, embedder.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-6)
    with torch.no_grad():
        expected = embedder.model.encode_text(embedder.tokenizer(texts), normalize=True).numpy()
    np.testing.assert_allclose(z, expected, atol=1e-6)


def test_a_single_string_is_a_batch_of_one(embedder):
    np.testing.assert_array_equal(embedder.embed_texts("red heart"), embedder.embed_texts(["red heart"]))


def test_images_as_pil_path_or_bytes_embed_the_same(embedder, tmp_path):
    data = png_bytes()
    path = tmp_path / "red.png"
    path.write_bytes(data)
    z = embedder.embed_images([Image.open(io.BytesIO(data)), path, str(path), data])
    assert z.dtype == np.float32 and z.shape == (4, embedder.embed_dim)
    for row in z[1:]:
        np.testing.assert_allclose(row, z[0], atol=1e-6)
    with torch.no_grad():
        pixels = embedder.preprocess(Image.open(io.BytesIO(data)))[None]
        expected = embedder.model.encode_image(pixels, normalize=True).numpy()
    np.testing.assert_allclose(z[:1], expected, atol=1e-6)


def test_embeddings_do_not_depend_on_batch_size(shared_tiny_export):
    # Dropless routing: batch neighbours cannot change an item's experts.
    # Equal up to float32 rounding (CPU matmul kernels differ by batch shape).
    one, many = limoe.Embedder(shared_tiny_export, batch_size=1), limoe.Embedder(shared_tiny_export, batch_size=64)
    texts, images = tiny_texts(12, seed=5), random_images(12, seed=5)
    np.testing.assert_allclose(one.embed_texts(texts), many.embed_texts(texts), atol=1e-6)
    np.testing.assert_allclose(one.embed_images(images), many.embed_images(images), atol=1e-6)
    assert one.forward_passes == 24 and many.forward_passes == 2


def test_long_texts_are_truncated_and_reported(embedder):
    tokenized = embedder.tokenize(["cat", " ".join(["purple heart"] * 30)])
    assert tokenized.truncated == [1]
    assert tokenized.num_tokens[1] == embedder.context_length
    assert tokenized.num_tokens[0] < embedder.context_length


def test_classify_ranks_the_label_whose_text_embedding_is_closest_first(embedder):
    images, labels = random_images(6, seed=3), ["red heart", "green tree", "blue car", "dog face"]
    probs = embedder.classify(images, labels)
    assert probs.dtype == np.float32 and probs.shape == (6, 4)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    similarity = embedder.embed_images(images) @ embedder.embed_texts(labels).T
    np.testing.assert_array_equal(probs.argmax(1), similarity.argmax(1))


def test_classify_averages_normalised_template_embeddings(embedder):
    labels, templates = ["cat", "star"], ["a {} emoji", "{c} face", "{}"]
    prompts = [t.replace("{c}", "{}").format(label) for label in labels for t in templates]
    z = embedder.embed_texts(prompts).reshape(2, 3, -1).mean(1)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    np.testing.assert_allclose(embedder.class_embeddings(labels, templates), z, atol=1e-6)
    image = random_images(1)
    expected = label_probabilities(embedder.embed_images(image), z, embedder.logit_scale)
    np.testing.assert_allclose(embedder.classify(image, labels, templates), expected, atol=1e-6)


def test_label_probabilities_are_a_softmax_of_scaled_cosine_similarity():
    image = np.array([[1.0, 0.0]], dtype=np.float32)
    classes = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    probs = label_probabilities(image, classes, logit_scale=2.0)
    np.testing.assert_allclose(probs, [[np.exp(2) / (np.exp(2) + 1), 1 / (np.exp(2) + 1)]], rtol=1e-6)
    unit = average_prompt_embeddings(np.array([[1, 0], [0, 1], [0, 1], [0, 1]], dtype=np.float32), 2)
    np.testing.assert_allclose(unit, [[np.sqrt(0.5), np.sqrt(0.5)], [0, 1]], atol=1e-6)


def test_template_without_placeholder_is_an_error(embedder):
    with pytest.raises(ValueError, match="placeholder"):
        embedder.classify(random_images(1), ["cat"], templates=["a photo"])


def test_no_labels_is_an_error(embedder):
    with pytest.raises(ValueError, match="no labels"):
        embedder.classify(random_images(1), [])


def test_transparent_and_grey_images_are_converted_to_rgb():
    assert load_image(png_bytes((255, 0, 0, 0), mode="RGBA")).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(png_bytes(128, mode="L")).mode == "RGB"


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"definitely not an image", "not a readable image"),
    (png_bytes()[:60], "cannot decode"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not a readable image"),  # EPS would run Ghostscript
])
def test_undecodable_bytes_are_an_image_error(data, message):
    with pytest.raises(ImageError, match=message) as info:
        load_image(data)
    assert info.value.code == "invalid_image"


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    bomb = png_claiming_size(3000, 3000)  # the 1x1 pixel payload could never fill it
    with pytest.raises(ImageError, match="9,000,000 pixels") as info:
        load_image(bomb, max_pixels=1000 * 1000)
    assert info.value.code == "image_too_large"


def thin_png(width: int, height: int) -> bytes:
    """A real, highly compressible grey PNG: 1 x 300,000 is 661 bytes."""
    buf = io.BytesIO()
    Image.new("L", (width, height), 128).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def test_aspect_ratio_limit_is_checked_from_the_header_before_decoding():
    with pytest.raises(ImageError, match=r"1x4000, an aspect ratio of 4,000:1, more than the limit of 100:1") as info:
        load_image(png_claiming_size(1, 4000))  # under the pixel limit; the payload could never fill it
    assert info.value.code == "extreme_aspect_ratio"
    with pytest.raises(ImageError, match="more than the limit of 10:1"):
        load_image(Image.new("RGB", (110, 10)), max_aspect_ratio=10)  # PIL images are checked too
    assert load_image(Image.new("RGB", (100, 10)), max_aspect_ratio=10).size == (100, 10)  # the limit itself is fine


MEMORY_PROBE = """
import io, resource, sys
from PIL import Image
from limoe import Embedder
from limoe.embedder import ImageError
embedder = Embedder(sys.argv[1])
images = {name: open(path, "rb").read() for name, path in zip(sys.argv[2::2], sys.argv[3::2])}
warm_up = io.BytesIO()
Image.new("L", (20, 20)).save(warm_up, format="PNG")
embedder.prepare_images([warm_up.getvalue()])  # lazy imports and first allocations happen before we measure
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for name, data in images.items():
    try:
        print(name, "accepted", tuple(embedder.prepare_images([data]).shape))
    except ImageError as e:
        print(name, "refused", e.code)
print("peak_growth_mb", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_the_memory_to_prepare_any_image_is_bounded(shared_tiny_export, tmp_path):
    """The issue's 1 x 300,000 PNG (661 bytes) was resized into a 16 x 4.8M intermediate: +577 MB of RSS
    with this 16 px model, 1.7 GB at 32 px. Now it is refused from its header, and the most costly image
    the default limits accept (16.7M pixels at a 100:1 aspect ratio) stays within a fixed bound."""
    thin, widest = tmp_path / "thin.png", tmp_path / "widest.png"
    thin.write_bytes(thin_png(1, 300_000))
    widest.write_bytes(thin_png(409, 40_900))  # 16,728,100 pixels <= 4096 x 4096, ratio exactly 100
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(shared_tiny_export), "thin", str(thin),
                          "widest", str(widest)], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["thin"] == "refused extreme_aspect_ratio"
    assert lines["widest"] == "accepted (1, 3, 16, 16)"
    # Decoding 16.7M grey pixels and converting them to RGB is ~67 MB; the resize adds 16 x 1,600 pixels.
    assert float(lines["peak_growth_mb"]) < 256, out.stdout


def test_pillow_decompression_bomb_error_becomes_an_image_error():
    bomb = png_claiming_size(100_000, 100_000)  # over 2x Image.MAX_IMAGE_PIXELS: Pillow refuses in open()
    with pytest.raises(ImageError, match="too large") as info:
        load_image(bomb, max_pixels=10**11)
    assert info.value.code == "image_too_large"


def test_image_errors_name_the_failing_image(embedder):
    with pytest.raises(ImageError, match="image 1: ") as info:
        embedder.embed_images([png_bytes(), b"junk"])
    assert info.value.index == 1


def test_missing_file_and_wrong_type_are_clear_errors(embedder, tmp_path):
    with pytest.raises(ImageError, match="cannot read"):
        embedder.embed_images([tmp_path / "missing.png"])
    with pytest.raises(TypeError, match="int"):
        embedder.embed_images([3])
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        embedder.embed_texts(["ok", 5])


def test_a_huge_text_gets_the_tokens_of_its_whole_and_is_marked_truncated(embedder):
    from limoe.embedder import MAX_TOKENIZED_CHARS

    huge = "red heart and a grinning cat " * (4 * MAX_TOKENIZED_CHARS // 29)  # only its start is tokenized
    tokenized = embedder.tokenize(["a dog", huge])
    assert torch.equal(tokenized.tokens, embedder.tokenizer(["a dog", huge]))
    assert tokenized.truncated == [1]


def test_a_text_with_a_lone_surrogate_is_a_value_error_naming_it(embedder):
    # What json.loads makes of "\\ud800": a str that no UTF-8 tokenizer can take.
    with pytest.raises(ValueError, match=r"texts\[1\] is not valid Unicode text \(surrogates not allowed at "
                                         r"position 2"):
        embedder.embed_texts(["ok", "ab\ud800"])


def test_model_facts(embedder, tiny_tokenizer):
    info = embedder.info()
    assert info["embedding_dim"] == 16 and info["image_size"] == 16
    assert info["context_length"] == tiny_tokenizer.context_length
    assert info["num_experts"] == 4 and info["moe_layers"] == [1]
    assert 0 < info["parameters"]["active_per_token"] < info["parameters"]["total"]


def test_loading_never_unpickles(shared_tiny_export, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an export must load without unpickling")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert limoe.Embedder(shared_tiny_export).embed_texts(["cat"]).shape == (1, 16)


def test_missing_export_is_an_export_error(tmp_path):
    with pytest.raises(limoe.ExportError, match="config.json"):
        limoe.Embedder(tmp_path / "nope")


def test_import_limoe_and_serve_settings_do_not_import_fastapi():
    # FastAPI/uvicorn are the optional `serve` extra: only limoe.serve's app and server need them.
    code = ("import sys, limoe, limoe.serve.settings, launch.cli; launch.cli.build_parser(); "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
