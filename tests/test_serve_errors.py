"""The service's answers to bad input, missing keys, overload and its own failures.

Every client mistake is a 4xx with an OpenAI-style error saying what was
wrong, and the server keeps serving afterwards.
"""
import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

import limoe
from limoe.serve import BackgroundServer, ServeSettings, create_app

from test_embedder import png_bytes, png_claiming_size

LIMITS = ServeSettings(max_items=4, max_prompts=6, max_request_bytes=20_000, max_image_pixels=64 * 64,
                       torch_threads=1)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def server(shared_tiny_export):
    with BackgroundServer(create_app(limoe.Embedder(shared_tiny_export), LIMITS)) as running:
        yield running


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def assert_still_serving(http):
    assert http.get("/health").json()["status"] == "ok"
    assert http.post("/v1/embeddings", json={"input": "red heart"}).status_code == 200


TEXT, IMAGE, CLASSIFY = "/v1/embeddings", "/v1/images/embeddings", "/v1/classify"
JSON = {"content-type": "application/json"}


def b64png() -> bytes:
    return b64(png_bytes()).encode()

BAD_REQUESTS = {
    # name: (path, request kwargs, status, code, param, words in the message)
    "empty list": (TEXT, {"json": {"input": []}}, 400, "empty_input", "input", "empty"),
    "empty string": (TEXT, {"json": {"input": ["cat", " "]}}, 400, "empty_input", "input", "input[1]"),
    "missing input": (TEXT, {"json": {"model": "limoe-nano"}}, 400, "missing_parameter", "input", "required"),
    "token ids": (TEXT, {"json": {"input": [[1, 2, 3]]}}, 400, "invalid_value", "input", "item 0 is list"),
    "number": (TEXT, {"json": {"input": 5}}, 400, "invalid_value", "input", "got int"),
    "encoding": (TEXT, {"json": {"input": "a", "encoding_format": "hex"}}, 400, "invalid_value",
                 "encoding_format", "encoding_format"),
    "dimensions": (TEXT, {"json": {"input": "a", "dimensions": 8}}, 400, "invalid_value", "dimensions",
                   "16 dimensions"),
    "unknown model": (TEXT, {"json": {"input": "a", "model": "text-embedding-3-small"}}, 404, "model_not_found",
                      "model", "limoe-nano"),
    "bad json": (TEXT, {"content": b'{"input": ', "headers": {"content-type": "application/json"}}, 400,
                 "invalid_json", None, "not valid JSON"),
    "json not utf-8": (TEXT, {"content": b'{"input": "\xff"}', "headers": JSON}, 400, "invalid_json", None,
                       "can't decode byte 0xff"),
    "empty json body": (TEXT, {"content": b"", "headers": JSON}, 400, "invalid_json", None,
                        "the request body is empty"),
    "lone surrogate": (TEXT, {"content": b'{"input": ["ok", "\\ud800"]}', "headers": JSON}, 400, "invalid_value",
                       "input", "item 1 is not valid Unicode text"),
    "not a json object": (TEXT, {"content": b'"cat"', "headers": {"content-type": "application/json"}}, 400,
                          "invalid_json", None, "must be a JSON object"),
    "too many texts": (TEXT, {"json": {"input": ["a"] * 5}}, 400, "too_many_items", "input", "5 > the limit of 4"),
    "body too large": (TEXT, {"json": {"input": ["word " * 5000]}}, 413, "request_too_large", None, "20,000 bytes"),
    "chunked body too large": (TEXT, {"content": iter([b'{"input": "'] + [b"x" * 1000] * 30 + [b'"}']),
                                      "headers": {"content-type": "application/json"}},
                               413, "request_too_large", None, "20,000 bytes"),
    "undecodable image": (IMAGE, {"json": {"input": [b64(png_bytes()), b64(b"not an image")]}}, 400,
                          "invalid_image", "input[1]", "image 1: not a readable image"),
    "truncated image": (IMAGE, {"files": {"input": ("x.png", png_bytes()[:60], "image/png")}}, 400,
                        "invalid_image", "input[0]", "cannot decode"),
    "not base64": (IMAGE, {"json": {"input": ["%%%"]}}, 400, "invalid_base64", "input[0]", "not valid base64"),
    "bad data url": (IMAGE, {"json": {"input": ["data:image/png,abc"]}}, 400, "invalid_base64", "input[0]",
                     "data URL"),
    "too many pixels": (IMAGE, {"json": {"input": [b64(png_claiming_size(65, 64))]}}, 400, "image_too_large",
                        "input[0]", "4,160 pixels"),
    "decompression bomb": (IMAGE, {"json": {"input": [b64(png_claiming_size(100_000, 100_000))]}}, 400,
                           "image_too_large", "input[0]", "too large"),
    "extreme aspect ratio": (IMAGE, {"json": {"input": [b64(png_claiming_size(1, 4000))]}}, 400,
                             "extreme_aspect_ratio", "input[0]", "more than the limit of 100:1"),
    "image json not utf-8": (IMAGE, {"content": b'{"input": "\xff"}', "headers": JSON}, 400, "invalid_json", None,
                             "can't decode byte 0xff"),
    "no images": (IMAGE, {"json": {"model": "limoe-nano"}}, 400, "empty_input", "input", "no images"),
    "no files": (IMAGE, {"files": {"model": (None, "limoe-nano")}}, 400, "empty_input", "input", "empty"),
    "too many images": (IMAGE, {"json": {"input": [b64(png_bytes())] * 5}}, 400, "too_many_items", "input",
                        "5 > the limit of 4"),
    "wrong content type": (IMAGE, {"content": b"abc", "headers": {"content-type": "text/plain"}}, 415,
                           "unsupported_media_type", None, "multipart/form-data"),
    "broken multipart": (IMAGE, {"content": b"abc", "headers": {"content-type": "multipart/form-data"}}, 400,
                         "invalid_multipart", None, "boundary"),
    "image json array": (IMAGE, {"json": [1, 2]}, 400, "invalid_value", None, "JSON body must be an object"),
    "no labels": (CLASSIFY, {"json": {"input": [b64(png_bytes())]}}, 400, "missing_parameter", "labels",
                  "required"),
    "empty labels": (CLASSIFY, {"json": {"input": [b64(png_bytes())], "labels": []}}, 400, "empty_input",
                     "labels", "at least one label"),
    "empty label": (CLASSIFY, {"json": {"input": [b64(png_bytes())], "labels": ["cat", ""]}}, 400, "empty_input",
                    "labels", "labels[1] is an empty string"),
    "labels not strings": (CLASSIFY, {"json": {"input": [b64(png_bytes())], "labels": ["a", 3]}}, 400,
                           "invalid_value", "labels", "labels.1"),
    "lone surrogate label": (CLASSIFY, {"content": b'{"input": ["%s"], "labels": ["\\ud800"]}' % b64png(),
                                        "headers": JSON}, 400, "invalid_value", "labels", "item 0 is not valid"),
    "lone surrogate template": (CLASSIFY, {"content": b'{"input": ["%s"], "labels": ["a"], "templates": ["\\udfff {}"]}'
                                           % b64png(), "headers": JSON},
                                400, "invalid_value", "templates", "item 0 is not valid Unicode text"),
    "template without slot": (CLASSIFY, {"json": {"input": [b64(png_bytes())], "labels": ["a"],
                                                  "templates": ["a photo"]}},
                              400, "invalid_value", "templates", "placeholder"),
    "too many prompts": (CLASSIFY, {"json": {"input": [b64(png_bytes())], "labels": ["a", "b", "c", "d"],
                                             "templates": ["{}", "a {}"]}},
                         400, "too_many_items", "labels", "4 labels x 2 templates"),
    "top_k zero": (CLASSIFY, {"json": {"input": [b64(png_bytes())], "labels": ["a"], "top_k": 0}}, 400,
                   "invalid_value", "top_k", "greater than or equal to 1"),
    "multipart top_k not a number": (CLASSIFY, {"files": {"input": ("x.png", png_bytes(), "image/png")},
                                                "data": {"labels": ["a", "b"], "top_k": "two"}},
                                     400, "invalid_value", "top_k", "integer"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_gets_a_4xx_error_saying_what_was_wrong(http, name):
    path, kwargs, status, code, param, words = BAD_REQUESTS[name]
    response = http.post(path, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["param"] == param
    assert words in error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert_still_serving(http)


def test_unknown_route_and_wrong_method_are_json_errors(http):
    missing = http.get("/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = http.get("/v1/embeddings")
    assert wrong.status_code == 405 and "GET is not allowed" in wrong.json()["error"]["message"]
    assert http.get("/v1/models/other").status_code == 404


def test_openai_client_raises_its_bad_request_error_with_our_message(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="too many texts"):
        client.embeddings.create(model="limoe-nano", input=["a"] * 5)


@pytest.fixture(scope="module")
def default_server(shared_tiny_export):
    with BackgroundServer(create_app(limoe.Embedder(shared_tiny_export), ServeSettings(torch_threads=1))) as running:
        yield running


def test_a_thin_image_under_the_pixel_limit_is_a_4xx_naming_the_aspect_ratio_limit(default_server):
    """A real 31 KB 1 x 16,000,000 PNG (under the 4096 x 4096 pixel limit) was a MemoryError and a 500."""
    from test_embedder import thin_png

    response = httpx.post(default_server.url + IMAGE, files={"input": ("thin.png", thin_png(1, 16_000_000))},
                          timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "extreme_aspect_ratio" and error["param"] == "input[0]"
    assert "1x16000000, an aspect ratio of 16,000,000:1, more than the limit of 100:1" in error["message"]


@pytest.mark.parametrize("path, head", [
    (TEXT, b'Content-Type: application/json\r\n\r\n{"input": ["' + b"a" * 500),
    (IMAGE, b'Content-Type: application/json\r\n\r\n{"input": ["' + b"A" * 500),
    (IMAGE, b'Content-Type: multipart/form-data; boundary=xx\r\n\r\n--xx\r\nContent-Disposition: form-data; '
            b'name="input"; filename="a.png"\r\n\r\n' + b"A" * 500),
], ids=["text json", "image json", "image multipart"])
def test_a_client_that_disconnects_mid_upload_is_not_an_internal_error(server, http, caplog, path, head):
    import logging
    import socket

    uvicorn_errors = logging.getLogger("uvicorn.error")  # does not propagate to the root logger caplog watches
    uvicorn_errors.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="limoe.serve"):
            with socket.create_connection((server.host, server.port)) as sock:
                # 10,000 bytes announced (under the 20,000 limit), 600 sent.
                sock.sendall(f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: 10000\r\n".encode() + head)
                time.sleep(0.2)  # the server is now waiting for the rest of the body
            deadline = time.monotonic() + 30  # a hang guard only
            while "client disconnected" not in caplog.text:
                assert time.monotonic() < deadline, caplog.text
                time.sleep(0.05)
    finally:
        uvicorn_errors.removeHandler(caplog.handler)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert f"client disconnected before sending the whole request body: POST {path}" in caplog.text
    assert_still_serving(http)


# -- API key ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def locked_server(shared_tiny_export):
    settings = ServeSettings(api_key="s3cret", torch_threads=1)
    with BackgroundServer(create_app(limoe.Embedder(shared_tiny_export), settings)) as running:
        yield running


@pytest.mark.parametrize("headers, code", [({}, "missing_api_key"),
                                           ({"Authorization": "Bearer wrong"}, "invalid_api_key"),
                                           ({"Authorization": "Basic s3cret"}, "missing_api_key")])
def test_api_key_is_required_when_configured(locked_server, headers, code):
    for method, path in [("POST", TEXT), ("POST", IMAGE), ("POST", CLASSIFY), ("GET", "/v1/models")]:
        response = httpx.request(method, locked_server.url + path, json={"input": "cat"}, headers=headers)
        assert response.status_code == 401, (path, response.text)
        assert response.json()["error"]["code"] == code
        assert response.headers["www-authenticate"] == "Bearer"


def test_the_right_api_key_works_with_the_openai_client(locked_server):
    client = openai.OpenAI(base_url=locked_server.url + "/v1", api_key="s3cret")
    assert len(client.embeddings.create(model="limoe-nano", input="cat").data[0].embedding) == 16
    assert httpx.get(locked_server.url + "/health").status_code == 200  # health checks need no key


def test_server_binds_loopback_by_default():
    from launch.cli import build_parser

    assert build_parser().parse_args(["serve", "--model", "m"]).host == "127.0.0.1"


# -- overload and server failures ----------------------------------------------------


def test_a_full_queue_answers_503_then_recovers(shared_tiny_export):
    embedder = limoe.Embedder(shared_tiny_export)
    busy, release = threading.Event(), threading.Event()
    encode = embedder.encode_tokens

    def slow_encode(tokens):
        busy.set()
        release.wait(30)
        return encode(tokens)

    embedder.encode_tokens = slow_encode
    app = create_app(embedder, ServeSettings(queue_size=1, max_batch_size=1, max_wait_ms=0))
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as http, \
            ThreadPoolExecutor(2) as pool:
        first = pool.submit(http.post, TEXT, json={"input": "one"})
        assert busy.wait(30)  # the worker holds the first request
        second = pool.submit(http.post, TEXT, json={"input": "two"})
        deadline = time.monotonic() + 30
        while http.get("/health").json()["batching"]["queued"] < 1:  # the second one fills the queue
            assert time.monotonic() < deadline
            time.sleep(0.01)
        third = http.post(TEXT, json={"input": "three"})
        assert third.status_code == 503
        assert third.json()["error"]["code"] == "queue_full" and third.headers["retry-after"] == "1"
        release.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
        assert http.post(TEXT, json={"input": "four"}).status_code == 200
        assert http.get("/health").json()["batching"]["rejected"] == 1


def test_a_model_failure_is_a_500_without_internals_and_the_server_survives(shared_tiny_export):
    embedder = limoe.Embedder(shared_tiny_export)

    def broken(pixels):
        raise RuntimeError("CUDA out of memory (pretend)")

    embedder.encode_pixels = broken
    with BackgroundServer(create_app(embedder), log_level="critical") as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        response = http.post(IMAGE, json={"input": [b64(png_bytes())]})
        assert response.status_code == 500
        assert response.json()["error"] == {"message": "internal server error (see the server log)",
                                            "type": "server_error", "param": None, "code": "internal_error"}
        assert_still_serving(http)
