"""OpenAI-style JSON errors: {"error": {"message", "type", "param", "code"}}.

Every client mistake is raised as an `APIError` with a 4xx status and a
message that says what was wrong; FastAPI's validation errors, unknown
routes and oversized bodies are turned into the same shape. Only a failure
of the server itself answers 500, without internals in the message.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

log = logging.getLogger("limoe.serve")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    503: "server_overloaded",
}


INTERNAL_ERROR = "internal server error (see the server log)"


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error" if status >= 500
                                                                        else "invalid_request_error"),
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def validation_message(error: dict) -> tuple[str, str | None, str]:
    """One pydantic validation error (an item of `errors()`) as (message, param, code)."""
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    if error.get("type") == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "")
        return f"request body is not valid JSON ({detail})".replace(" ()", ""), None, "invalid_json"
    if not loc and error.get("type") in ("model_attributes_type", "dict_type"):
        return ("the request body must be a JSON object sent with 'Content-Type: application/json'", None,
                "invalid_json")
    param = loc[0] if loc else None
    message = error.get("msg", "invalid request").removeprefix("Value error, ")
    where = ".".join(loc)
    if error.get("type") == "missing" and not loc:
        return "the request body is empty: send a JSON object with 'Content-Type: application/json'", None, \
            "invalid_json"
    if error.get("type") == "missing":
        return f"'{where}' is required", param, "missing_parameter"
    return (f"{where}: {message}" if where else message), param, "invalid_value"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        message, param, code = validation_message(exc.errors()[0])
        return error_response(400, message, param, code)

    @app.exception_handler(ClientDisconnect)
    async def client_disconnected(request: Request, exc: ClientDisconnect):
        # The client's mistake or its network's, not ours; nobody is left to read the answer.
        log.info("client disconnected before sending the whole request body: %s %s", request.method,
                 request.url.path)
        return error_response(400, "the client disconnected before the request body was complete",
                              code="client_disconnected")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if isinstance(exc.__cause__, ClientDisconnect):  # FastAPI wraps errors while reading a JSON body
            return await client_disconnected(request, exc.__cause__)
        # 400s come from reading the body: Starlette's multipart parser, or FastAPI's JSON body
        # (which says only "There was an error parsing the body", e.g. for bytes that are not UTF-8).
        multipart = request.headers.get("content-type", "").startswith("multipart/")
        code = {400: "invalid_multipart" if multipart else "invalid_json", 404: "not_found",
                405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path} (see /docs)"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        elif exc.status_code == 400 and not multipart and exc.__cause__ is not None:
            message = f"request body is not valid JSON ({exc.__cause__})"
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, code=code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, INTERNAL_ERROR, code="internal_error")
