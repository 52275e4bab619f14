"""One error hierarchy for serving, with HTTP status codes; each transport maps it once. Also
the pieces every transport shares for refusing a call: the admin token check, the one-line
reason and the log line of a rejected request."""

import hmac
import logging
from collections.abc import Iterable
from typing import Any

__all__ = [
    "InvalidInput",
    "NotFound",
    "ServingError",
    "Unauthorized",
    "Unavailable",
    "bearer_matches",
    "field_errors",
    "log_rejected",
    "one_line",
]

log = logging.getLogger("serving.rejected")


def bearer_matches(given: str | bytes, token: str) -> bool:
    """``given`` (an Authorization header or gRPC metadata value) is ``Bearer <token>``,
    compared in constant time as bytes: a value with characters outside ASCII is simply wrong,
    never an error (``hmac.compare_digest`` refuses such str)."""
    if isinstance(given, str):
        given = given.encode("utf-8", "surrogateescape")
    return hmac.compare_digest(given, f"Bearer {token}".encode())


def one_line(text: str, limit: int = 500) -> str:
    """``text`` on one line, at most ``limit`` characters (for logs)."""
    line = " ".join(text.split())
    return line if len(line) <= limit else f"{line[: limit - 1]}…"


def field_errors(errors: Iterable[dict[str, Any]], limit: int = 10) -> str:
    """``loc: msg; ...`` for pydantic-style field errors."""
    return "; ".join(
        f"{'.'.join(str(part) for part in error.get('loc', ()))}: {error.get('msg', '')}"
        for error, _ in zip(errors, range(limit), strict=False)
    )


def log_rejected(call: str, status: Any, reason: str, *, failed: bool = False) -> None:
    """One line per refused call, never a traceback: WARNING for the caller's error, ERROR
    (``failed``) for the server's."""
    log.log(
        logging.ERROR if failed else logging.WARNING,
        "%s %s: %s %s",
        call,
        "failed" if failed else "rejected",
        status,
        one_line(reason),
    )


class ServingError(Exception):
    """Base error; ``status_code`` is the HTTP status (gRPC codes derive from it)."""

    def __init__(self, message: str, status_code: int = 500) -> None:
        super().__init__(message)
        self.status_code = status_code

    def body(self) -> dict[str, Any]:
        return {"detail": str(self)}


class InvalidInput(ServingError):
    """Field-level validation errors (HTTP 422, gRPC INVALID_ARGUMENT)."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        # The published 422 schema: every error has loc, msg and type.
        self.errors = [{"type": "value_error", **error} for error in errors]
        super().__init__(f"invalid input: {field_errors(errors)}", 422)

    def body(self) -> dict[str, Any]:
        return {"detail": self.errors}


class Unauthorized(ServingError):
    def __init__(self, message: str = "admin token missing or wrong") -> None:
        super().__init__(message, 401)


class NotFound(ServingError):
    def __init__(self, message: str) -> None:
        super().__init__(message, 404)


class Unavailable(ServingError):
    def __init__(self, message: str) -> None:
        super().__init__(message, 503)
