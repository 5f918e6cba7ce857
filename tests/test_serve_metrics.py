"""GET /metrics: Prometheus text format, parsed with prometheus_client's own parser."""
import io

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import limoe
from limoe.serve import BackgroundServer, ServeSettings, create_app
from limoe.serve.metrics import InputRate


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def scrape(http) -> dict:
    """{metric family name: {(sample name, sorted labels): value}} from GET /metrics."""
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families = {}
    for family in text_string_to_metric_families(response.text):
        families[family.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
    return families


def value(families, family, sample, **labels) -> float:
    return families[family].get((sample, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def server(shared_tiny_export):
    """A fresh server per test: every count starts at zero."""
    settings = ServeSettings(max_batch_size=8, max_wait_ms=5, torch_threads=1, max_request_bytes=10_000)
    with BackgroundServer(create_app(limoe.Embedder(shared_tiny_export), settings)) as running:
        yield running


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def test_every_series_is_exported_at_zero_before_any_request(http):
    families = scrape(http)
    assert {"limoe_http_requests", "limoe_http_request_duration_seconds", "limoe_http_requests_in_progress",
            "limoe_batch_size", "limoe_batch_duration_seconds", "limoe_queue_wait_seconds", "limoe_inputs",
            "limoe_inputs_per_second", "limoe_queue_depth"} <= set(families)
    for kind in ("text", "image"):
        assert value(families, "limoe_inputs", "limoe_inputs_total", kind=kind) == 0
        assert value(families, "limoe_batch_size", "limoe_batch_size_count", kind=kind) == 0
        assert value(families, "limoe_inputs_per_second", "limoe_inputs_per_second", kind=kind) == 0
    assert value(families, "limoe_queue_depth", "limoe_queue_depth") == 0


def test_requests_are_counted_by_endpoint_template_method_and_status(http):
    assert http.post("/v1/embeddings", json={"input": ["red heart", "a cat"]}).status_code == 200
    assert http.post("/v1/embeddings", json={"input": []}).status_code == 400
    assert http.get("/v1/models/limoe-nano").status_code == 200
    assert http.get("/v1/models/another-model").status_code == 404
    assert http.get("/no/such/path").status_code == 404
    assert http.post("/v1/embeddings", content=b"x" * 20_000,
                     headers={"content-type": "application/json"}).status_code == 413
    families = scrape(http)
    counted = {labels: v for (name, labels), v in families["limoe_http_requests"].items()
               if name == "limoe_http_requests_total"}

    def count(endpoint, method, status):
        return counted.get((("endpoint", endpoint), ("method", method), ("status", status)), 0)

    assert count("/v1/embeddings", "POST", "200") == 1
    assert count("/v1/embeddings", "POST", "400") == 1
    assert count("/v1/embeddings", "POST", "413") == 1  # refused by the body-size limit, before routing
    assert count("/v1/models/{name}", "GET", "200") == 1  # the template, not the id sent
    assert count("/v1/models/{name}", "GET", "404") == 1
    assert count("other", "GET", "404") == 1
    latency = families["limoe_http_request_duration_seconds"]
    assert value(families, "limoe_http_request_duration_seconds", "limoe_http_request_duration_seconds_count",
                 endpoint="/v1/embeddings") == 3
    assert latency[("limoe_http_request_duration_seconds_sum", (("endpoint", "/v1/embeddings"),))] > 0
    buckets = sorted((float(dict(labels)["le"]), v) for (name, labels), v in latency.items()
                     if name.endswith("_bucket") and dict(labels)["endpoint"] == "/v1/embeddings")
    assert buckets[-1] == (float("inf"), 3) and all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))


def test_inputs_and_batch_sizes_are_counted_per_modality(http):
    assert http.post("/v1/embeddings", json={"input": ["red heart", "a cat", "blue fish"]}).status_code == 200
    files = [("input", (f"{i}.png", png(), "image/png")) for i in range(2)]
    assert http.post("/v1/images/embeddings", files=files).status_code == 200
    families = scrape(http)
    assert value(families, "limoe_inputs", "limoe_inputs_total", kind="text") == 3
    assert value(families, "limoe_inputs", "limoe_inputs_total", kind="image") == 2
    assert value(families, "limoe_batch_size", "limoe_batch_size_count", kind="text") == 1
    assert value(families, "limoe_batch_size", "limoe_batch_size_sum", kind="text") == 3
    assert value(families, "limoe_batch_size", "limoe_batch_size_bucket", kind="image", le="2.0") == 1
    assert value(families, "limoe_batch_size", "limoe_batch_size_bucket", kind="image", le="1.0") == 0
    assert value(families, "limoe_queue_wait_seconds", "limoe_queue_wait_seconds_count", kind="image") == 1
    assert value(families, "limoe_batch_duration_seconds", "limoe_batch_duration_seconds_sum", kind="text") > 0
    assert value(families, "limoe_inputs_per_second", "limoe_inputs_per_second", kind="text") == pytest.approx(3 / 60)


def test_two_apps_in_one_process_count_separately(shared_tiny_export, http):
    other = create_app(limoe.Embedder(shared_tiny_export), ServeSettings(torch_threads=1))
    with BackgroundServer(other) as running, httpx.Client(base_url=running.url, timeout=30) as other_http:
        assert other_http.post("/v1/embeddings", json={"input": ["a cat"]}).status_code == 200
        assert value(scrape(other_http), "limoe_inputs", "limoe_inputs_total", kind="text") == 1
    assert value(scrape(http), "limoe_inputs", "limoe_inputs_total", kind="text") == 0


def test_input_rate_forgets_inputs_older_than_its_window():
    now = [100.0]
    rate = InputRate(["text"], window=60, clock=lambda: now[0])
    rate.add("text", 30)
    now[0] = 130.0
    rate.add("text", 90)
    assert rate.per_second() == {"text": 2.0}
    now[0] = 161.0  # the first 30 are 61 s old
    assert rate.per_second() == {"text": 1.5}
