"""The HTTP service over real sockets: a uvicorn server on a free 127.0.0.1 port, on a thread."""
import base64
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

import limoe
from limoe.serve import BackgroundServer, ServeSettings, create_app

from conftest import tiny_texts
from test_embedder import random_images


def image_bytes(images) -> list[bytes]:
    out = []
    for image in images:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


@pytest.fixture(scope="module")
def reference(shared_tiny_export):
    """An Embedder of the same export, called directly: what the server must reproduce."""
    return limoe.Embedder(shared_tiny_export)


@pytest.fixture(scope="module")
def server(shared_tiny_export):
    embedder = limoe.Embedder(shared_tiny_export, batch_size=32)
    # One torch thread: on a busy shared CPU, OpenMP barriers cost more than the tiny model's math.
    settings = ServeSettings(max_batch_size=32, max_wait_ms=20, torch_threads=1)
    with BackgroundServer(create_app(embedder, settings)) as running:
        yield running


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def batching(http) -> dict:
    return http.get("/health").json()["batching"]


def test_openai_client_default_base64_path_returns_the_embedder_vectors(server, reference):
    # The client asks for base64 (little-endian float32) when the caller gives no encoding_format.
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    texts = tiny_texts(5, seed=11)
    response = client.embeddings.create(model="limoe-nano", input=texts)
    got = np.array([d.embedding for d in response.data], dtype=np.float32)
    np.testing.assert_allclose(got, reference.embed_texts(texts), atol=1e-6)
    assert [d.index for d in response.data] == list(range(5))
    assert response.model == "limoe-nano" and response.object == "list"
    assert response.usage.prompt_tokens == sum(reference.tokenize(texts).num_tokens)


def test_openai_client_float_format_and_a_single_string(server, reference):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    response = client.embeddings.create(model="limoe-nano", input="red heart", encoding_format="float")
    assert isinstance(response.data[0].embedding, list) and len(response.data) == 1
    np.testing.assert_allclose(np.float32(response.data[0].embedding), reference.embed_texts(["red heart"])[0],
                               atol=1e-6)


def test_base64_is_little_endian_float32_of_the_float_response(http):
    body = {"input": ["blue car", "cat"], "model": "limoe-nano"}
    floats = http.post("/v1/embeddings", json=body).json()["data"]
    encoded = http.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()["data"]
    for f, b in zip(floats, encoded):
        np.testing.assert_array_equal(np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4"),
                                      np.float32(f["embedding"]))


def test_truncated_texts_are_reported_in_usage(http, reference):
    long_text = " ".join(["purple heart"] * 30)
    usage = http.post("/v1/embeddings", json={"input": ["cat", long_text, "dog", long_text]}).json()["usage"]
    assert usage["truncated"] == 2 and usage["truncated_indices"] == [1, 3]
    assert usage["prompt_tokens"] == usage["total_tokens"] == sum(
        reference.tokenize(["cat", long_text, "dog", long_text]).num_tokens)


def test_image_uploads_and_base64_json_embed_like_the_embedder(http, reference):
    blobs = image_bytes(random_images(3, seed=4))
    expected = reference.embed_images(blobs)
    files = [("input", (f"{i}.png", blob, "image/png")) for i, blob in enumerate(blobs)]
    uploaded = http.post("/v1/images/embeddings", files=files)
    assert uploaded.status_code == 200, uploaded.text
    body = uploaded.json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1, 2]
    assert body["usage"]["images"] == 3
    np.testing.assert_allclose(np.float32([d["embedding"] for d in body["data"]]), expected, atol=1e-6)

    as_json = {"input": [base64.b64encode(blobs[0]).decode(),
                         "data:image/png;base64," + base64.b64encode(blobs[1]).decode()],
               "encoding_format": "base64"}
    data = http.post("/v1/images/embeddings", json=as_json).json()["data"]
    got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data])
    np.testing.assert_allclose(got, expected[:2], atol=1e-6)


def test_classify_top_label_is_the_closest_label_text_embedding(http, reference):
    images, labels = random_images(4, seed=8), ["red heart", "green tree", "blue car", "dog face", "star"]
    blobs = image_bytes(images)
    body = {"input": [base64.b64encode(b).decode() for b in blobs], "labels": labels}
    response = http.post("/v1/classify", json=body)
    assert response.status_code == 200, response.text
    closest = (reference.embed_images(blobs) @ reference.embed_texts(labels).T).argmax(1)
    expected_probs = reference.classify(blobs, labels)
    for i, result in enumerate(response.json()["data"]):
        assert result["index"] == i and result["label"] == labels[closest[i]]
        probs = [p["probability"] for p in result["ranking"]]
        assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-5
        assert {p["label"] for p in result["ranking"]} == set(labels)
        assert result["probability"] == pytest.approx(expected_probs[i].max(), abs=1e-6)


def test_classify_multipart_with_templates_and_top_k(http, reference):
    blobs = image_bytes(random_images(2, seed=9))
    labels, templates = ["cat", "moon", "flag"], ["a {} emoji", "{}"]
    response = http.post("/v1/classify", files=[("input", ("x.png", b, "image/png")) for b in blobs],
                         data={"labels": labels, "templates": templates, "top_k": "2"})
    assert response.status_code == 200, response.text
    expected = reference.classify(blobs, labels, templates)
    for row, result in zip(expected, response.json()["data"]):
        assert [p["label"] for p in result["ranking"]] == [labels[j] for j in np.argsort(-row)[:2]]
    assert response.json()["usage"]["prompts"] == 6


def test_32_concurrent_requests_are_coalesced_and_match_single_requests(server, http):
    texts = tiny_texts(32, seed=21)
    alone = [np.float32(http.post("/v1/embeddings", json={"input": t}).json()["data"][0]["embedding"])
             for t in texts]
    before = batching(http)
    start = threading.Barrier(32)

    def one_request(text):
        with httpx.Client(base_url=server.url, timeout=60) as client:
            start.wait()
            return client.post("/v1/embeddings", json={"input": text})

    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(one_request, texts))
    after = batching(http)
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    assert after["requests"] - before["requests"] == 32
    assert after["batches"] - before["batches"] < 32, "concurrent requests were not batched together"
    assert after["largest_batch"] > 1
    for r, single in zip(responses, alone):
        np.testing.assert_allclose(np.float32(r.json()["data"][0]["embedding"]), single, atol=1e-6)


def test_concurrent_text_and_image_requests_are_batched_per_modality(server, http, reference):
    blobs = image_bytes(random_images(16, seed=31))
    texts = tiny_texts(16, seed=31)
    before = batching(http)
    start = threading.Barrier(32)

    def one_request(i):
        with httpx.Client(base_url=server.url, timeout=60) as client:
            start.wait()
            if i % 2:
                return client.post("/v1/images/embeddings", files={"input": ("x.png", blobs[i // 2], "image/png")})
            return client.post("/v1/embeddings", json={"input": texts[i // 2]})

    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(one_request, range(32)))
    assert all(r.status_code == 200 for r in responses)
    after = batching(http)
    assert after["batches"] - before["batches"] < 32
    got_text = np.float32([r.json()["data"][0]["embedding"] for r in responses[0::2]])
    got_image = np.float32([r.json()["data"][0]["embedding"] for r in responses[1::2]])
    np.testing.assert_allclose(got_text, reference.embed_texts(texts), atol=1e-6)
    np.testing.assert_allclose(got_image, reference.embed_images(blobs), atol=1e-6)


def test_models_lists_the_model_with_its_embedding_size(http):
    body = http.get("/v1/models").json()
    assert body["object"] == "list" and len(body["data"]) == 1
    card = body["data"][0]
    assert card["id"] == "limoe-nano" and card["object"] == "model"
    assert card["embedding_dim"] == 16 and card["image_size"] == 16 and card["context_length"] == 8
    assert card["details"]["num_experts"] == 4
    assert http.get("/v1/models/limoe-nano").json()["id"] == "limoe-nano"


def test_health_reports_status_limits_and_counters(http):
    body = http.get("/health").json()
    assert body["status"] == "ok" and body["model"] == "limoe-nano"
    assert {"requests", "batches", "forward_passes", "queued", "rejected", "model_seconds"} <= set(body["batching"])
    assert body["limits"]["max_batch_size"] == 32
    assert "api_key" not in body["limits"]


def test_openapi_docs_are_served(http):
    spec = http.get("/openapi.json").json()
    assert {"/v1/embeddings", "/v1/images/embeddings", "/v1/classify", "/v1/models", "/health"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert http.get("/docs").status_code == 200
