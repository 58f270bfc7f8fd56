"""How errors become responses: 422 for bad input (always renderable), and the queue's refusals.

FastAPI's own 422 handler echoes each bad value back. When that value is NaN or ±Infinity
(JSON's `NaN`, `Infinity`, or `1e400`, which parses to infinity) or a string with a lone
surrogate, the echo cannot be encoded and the handler itself fails with a 500. Ours keeps the
same shape (`{"detail": [{"loc", "msg", "type", "input"?}]}`, FastAPI's `HTTPValidationError`)
but echoes only scalars that JSON can carry, with unencodable characters escaped.

The queue (`service.queue`) raises plain exceptions that know nothing of HTTP; each maps to one
status here: 403 not the owner, 409 idempotency conflict, 422 compute budget, 429 per-key limit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service.queue import (
    BudgetExceededError,
    IdempotencyConflictError,
    NotOwnerError,
    QueueRefusalError,
    TooManyStudiesError,
)

__all__ = ["install_error_handlers", "safe_text", "validation_detail"]

_STATUS: dict[type[QueueRefusalError], int] = {
    NotOwnerError: 403,
    IdempotencyConflictError: 409,
    BudgetExceededError: 422,
    TooManyStudiesError: 429,
}
_MAX_ECHO = 200  # characters of a bad string echoed back


def safe_text(text: str) -> str:
    """`text` with lone surrogates escaped (`\\udc80`), so that it encodes as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _safe_input(value: Any) -> Any:
    """The bad value if JSON can carry it as it is (a finite number, a short string), else
    nothing: containers and non-finite numbers are not echoed."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):  # clients may not parse integers beyond 64 bits
        return value if abs(value) < 2**63 else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return safe_text(value[:_MAX_ECHO])
    return None


def validation_detail(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Pydantic's error dicts as JSON-safe items: `loc`, `msg`, `type`, and `input` when safe."""
    detail = []
    for error in errors:
        loc = [part if isinstance(part, int) else safe_text(str(part)) for part in error["loc"]]
        item: dict[str, Any] = {
            "loc": loc,
            "msg": safe_text(str(error.get("msg", ""))),
            "type": str(error.get("type", "value_error")),
        }
        echo = _safe_input(error.get("input"))
        if echo is not None:
            item["input"] = echo
        detail.append(item)
    return detail


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(status_code=422, content={"detail": validation_detail(exc.errors())})


async def _queue_refusal(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, QueueRefusalError)
    status = _STATUS[type(exc)]
    if isinstance(exc, BudgetExceededError):  # the same shape as every other invalid spec
        content: dict[str, Any] = {
            "detail": [{"loc": ["body", *exc.loc], "msg": str(exc), "type": "compute_budget"}]
        }
    else:
        content = {"detail": str(exc)}
    headers = {"Retry-After": "60"} if status == 429 else None
    return JSONResponse(status_code=status, content=content, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers above on `app`."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    for refusal in _STATUS:
        app.add_exception_handler(refusal, _queue_refusal)
