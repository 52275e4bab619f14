"""One error hierarchy for serving, with HTTP status codes; each transport maps it once."""

from typing import Any

__all__ = ["InvalidInput", "NotFound", "ServingError", "Unauthorized", "Unavailable"]


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
        summary = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors[:10]
        )
        super().__init__(f"invalid input: {summary}", 422)

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
