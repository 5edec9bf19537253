"""Bounded request validation: 422 bodies of a bounded size, JSON bodies parsed off the event loop,
a body that is not JSON a 400 naming where and why it does not parse (on the fast paths and
on FastAPI's own, ``body_parse_error_handler``).

A JSON body of a few megabytes that is wrong in every element (a vector of a million
strings) must not cost the server seconds of event-loop time nor answer with one
error per element each echoing its input: ``validation_error_handler`` reports the
first ``MAX_REPORTED_ERRORS`` errors (and ``error_count``, all of them) with long
inputs shortened, and ``parse_json_body`` parses and validates a large body in a worker
thread. Vector fields declare a ``max_length`` (``lookalike.serving.schemas.MAX_DIM``), which
pydantic checks before it validates any element.
"""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any, TypeVar

import numpy as np
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

MAX_REPORTED_ERRORS = 10
MAX_ECHO_CHARS = 100
# JSON bodies larger than this are parsed and validated in the thread pool, not on the event loop.
OFFLOOP_JSON_BYTES = 64 * 1024

M = TypeVar("M", bound=BaseModel)
FLOAT32_MAX = float(np.finfo(np.float32).max)


def short_input(value: Any, depth: int = 0) -> Any:
    """``value`` (an error's ``input``) small enough to echo: long strings cut, large
    arrays and objects summarised, and a NaN or infinity (Python's JSON parser accepts
    ``NaN``, ``Infinity`` and ``1e400``) named as a string, which a JSON response can hold."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, str):
        return value if len(value) <= MAX_ECHO_CHARS else value[:MAX_ECHO_CHARS] + f"... ({len(value)} characters)"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 3 * MAX_ECHO_CHARS:
        digits = str(abs(value))
        return ("-" if value < 0 else "") + digits[:20] + f"... ({len(digits)} digits)"
    if isinstance(value, (bytes, bytearray)):
        return short_input(bytes(value[: MAX_ECHO_CHARS + 1]).decode("utf-8", "replace"), depth) if len(value) <= MAX_ECHO_CHARS \
            else f"<{len(value)} bytes>"
    if isinstance(value, (list, tuple)):
        if len(value) > 10 or depth >= 2:
            return f"<array of {len(value)} values>"
        return [short_input(v, depth + 1) for v in value]
    if isinstance(value, dict):
        if len(value) > 10 or depth >= 2:
            return f"<object of {len(value)} fields>"
        return {short_input(str(k), depth + 1): short_input(v, depth + 1) for k, v in value.items()}
    return value


def bounded_errors(errors: Any) -> tuple[list[dict[str, Any]], int]:
    """The first MAX_REPORTED_ERRORS of ``errors`` with their inputs shortened, and how many there were."""
    errors = list(errors)
    shown = []
    for error in errors[:MAX_REPORTED_ERRORS]:
        error = dict(error)
        value = error.get("input")
        if error.get("type") == "float_type" and isinstance(value, int) and not isinstance(value, bool):
            # pydantic's "Input should be a valid number" for an integer beyond a float's range
            error["msg"] = f"Input is a number too large: it overflows float32 (largest magnitude {FLOAT32_MAX:.4g})"
        if "input" in error:
            error["input"] = short_input(error["input"])
        if isinstance(error.get("ctx"), dict):
            # an exception in ctx (a validator's ValueError) as its message: JSON gave it as {}
            error["ctx"] = {key: str(value) if isinstance(value, Exception) else short_input(value)
                            for key, value in error["ctx"].items()}
        shown.append(error)
    return shown, len(errors)


def invalid_json_reason(errors: list[Any]) -> str | None:
    """``invalid JSON body at character N: <the parser's reason>`` when ``errors`` report a body
    that is not JSON at all (FastAPI's and ``_parse``'s ``json_invalid``), else None."""
    for error in errors:
        if error.get("type") == "json_invalid":
            loc = tuple(error.get("loc", ()))
            where = f" at character {loc[1]}" if len(loc) > 1 and isinstance(loc[1], int) else ""
            return f"invalid JSON body{where}: {(error.get('ctx') or {}).get('error') or 'not JSON'}"
    return None


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 ``{"detail": [first errors], "error_count": n}`` (FastAPI's shape, bounded); a JSON
    endpoint's body sent without a JSON content type (a multipart upload included) is a 422
    saying so. A body that does not
    parse as JSON is a malformed request, as a malformed multipart form is: 400 with
    ``{"detail": "invalid JSON body at character N: <reason>"}``."""
    errors = exc.errors()
    reason = invalid_json_reason(errors)
    if reason is not None:
        return JSONResponse({"detail": reason}, status_code=400)
    if request.method == "POST" and not is_json(request) and any(tuple(e.get("loc", ())) == ("body",) for e in errors):
        got = media_type(request) or "no Content-Type"
        hint = ("; an image file is searched for by a multipart upload to /v1/search/image"
                if got.startswith("multipart/") else "")
        return JSONResponse({"detail": f"the body must be JSON sent with 'Content-Type: application/json' (got {got}){hint}"},
                            status_code=422)
    shown, count = bounded_errors(errors)
    return JSONResponse({"detail": jsonable_encoder(shown), "error_count": count}, status_code=422)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


def is_json(request: Request) -> bool:
    return media_type(request) == "application/json"


def json_like(request: Request, body: bytes) -> bool:
    """A JSON body: declared so, or sent with no content type or curl -d's form type but
    looking like a JSON object or array."""
    if is_json(request):
        return True
    return media_type(request) in ("", "application/x-www-form-urlencoded") and body.lstrip()[:1] in (b"{", b"[")


def _parse(model: type[M], body: bytes) -> M | None:
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:  # FastAPI's error for bad JSON (a 400: the handler), without parsing it again
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", e.pos), "msg": "JSON decode error",
                                       "input": {}, "ctx": {"error": e.msg}}]) from None
    except Exception as e:  # a 400 naming the reason, not FastAPI's "There was an error parsing the body"
        reason = json_failure_reason(e, body)
        if reason is None:  # FastAPI answers: 400
            return None
        raise _invalid_json(reason) from None
    try:
        return model.model_validate(data, from_attributes=True)  # as FastAPI validates a body
    except ValidationError as e:  # as FastAPI reports a body's errors, bounded by the handler
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)]) from None


def json_failure_reason(error: BaseException | None, body: bytes = b"") -> str | None:
    """Why Python's JSON parser failed on ``body``, for the errors that are not a
    ``JSONDecodeError`` (whose position and reason FastAPI reports): bytes that are not
    UTF-8, nesting too deep, an integer of more than 4300 digits (at the character where it
    starts, when found in ``body``); None for any other error."""
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 at byte {error.start} ({error.reason})"
    if isinstance(error, RecursionError):
        return "nested too deep (arrays or objects inside each other)"
    if isinstance(error, ValueError) and "integer string conversion" in str(error):
        long = re.search(rb"\d{%d,}" % (sys.get_int_max_str_digits() + 1), body)  # the parser's limit
        where = f" (the number at character {len(body[:long.start()].decode('utf-8', 'replace'))})" if long else ""
        return str(error).split(";")[0] + where
    return None


async def body_parse_error_handler(request: Request, exc: HTTPException) -> Response:
    """FastAPI's 400 "There was an error parsing the body" for a JSON body, with the reason
    ``json_failure_reason`` gives, as the fast paths answer it (``parse_json_body``); any
    other HTTPException as FastAPI answers it. (Registered for Starlette's HTTPException,
    which FastAPI raises there; FastAPI's own subclass goes through it too.)"""
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        reason = json_failure_reason(exc.__cause__, await request.body())
        if reason is not None:
            return JSONResponse({"detail": f"invalid JSON body: {reason}"}, status_code=400)
    return await http_exception_handler(request, exc)


def _invalid_json(reason: str) -> RequestValidationError:
    """The error ``validation_error_handler`` answers with a 400 ``invalid JSON body: reason``."""
    return RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error", "input": {},
                                    "ctx": {"error": reason}}])


async def parse_json_body(request: Request, model: type[M]) -> M | None:
    """The request's JSON body validated as ``model``; None when it is not JSON (FastAPI then
    answers as it would; a body that looks like JSON is taken as JSON without a content type
    or with curl -d's ``application/x-www-form-urlencoded``); RequestValidationError (FastAPI's 422, same errors) when invalid. A
    body over OFFLOOP_JSON_BYTES is parsed and validated in the thread pool."""
    body = await request.body()
    if not body or not json_like(request, body):
        return None
    if len(body) > OFFLOOP_JSON_BYTES:
        return await run_in_threadpool(_parse, model, body)
    return _parse(model, body)
