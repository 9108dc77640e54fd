"""OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import orjson


class ApiError(Exception):
    """An error answered to the client; raised anywhere in request handling."""

    def __init__(self, status: int, message: str, type_: str, code: str | None = None,
                 param: str | None = None, headers: list[tuple[bytes, bytes]] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = headers or []

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def bad_request(message: str, code: str = "invalid_request", param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param)


def not_found(message: str, code: str = "not_found") -> ApiError:
    return ApiError(404, message, "invalid_request_error", code)


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, "authentication_error", "invalid_api_key",
                    headers=[(b"www-authenticate", b'Bearer realm="albert"')])


def forbidden(message: str) -> ApiError:
    return ApiError(403, message, "permission_error", "model_not_allowed", "model")


def too_many(message: str, retry_after: float) -> ApiError:
    seconds = max(1, int(retry_after + 0.999))
    return ApiError(429, message, "rate_limit_error", "rate_limit_exceeded",
                    headers=[(b"retry-after", str(seconds).encode())])


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body larger than {limit} bytes", "invalid_request_error",
                    "request_too_large")


def upstream_unavailable(message: str, retry_after: int = 1) -> ApiError:
    return ApiError(503, message, "server_error", "model_unavailable",
                    headers=[(b"retry-after", str(retry_after).encode())])


def bad_gateway(message: str) -> ApiError:
    return ApiError(502, message, "server_error", "upstream_error")


def gateway_timeout(message: str) -> ApiError:
    return ApiError(504, message, "server_error", "upstream_timeout")
