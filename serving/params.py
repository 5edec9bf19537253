"""The endpoints' inputs as FastAPI declares them: query and path parameters (with the
limits and descriptions /openapi.json shows), the image upload body, error responses,
and the dependencies that hand an endpoint the served backend and the query engine."""

from __future__ import annotations

from typing import Annotated, Any

import annotated_types
from fastapi import Depends, HTTPException, Path, Query, Request
from pydantic import BeforeValidator
from pydantic_core import PydanticKnownError

from lookalike.serving.backend import Backend
from lookalike.serving.engine import QueryEngine
from lookalike.serving.queries import UPLOAD_FIELD, no_unknown_query_params
from lookalike.serving.schemas import MAX_K, ErrorMessage, FilterValue, Kind, ValidationErrorMessage

def whole_number(value: Any) -> Any:
    """A count in the query string as people write it: decimal digits only (pydantic's lax int
    also reads 5.0, 1_0 and +5, which the web page refuses)."""
    if isinstance(value, str) and not (value.strip().isascii() and value.strip().isdigit()):
        if value.strip()[:1] == "-" and value.strip()[1:].isascii() and value.strip()[1:].isdigit():  # as 0 is told
            raise PydanticKnownError("greater_than_equal", {"ge": 1})
        raise ValueError(f"expected a whole number such as 5, got {value!r}")
    return value


# The limits sit on the int itself, inside the whole-number check: on Query() beside a
# BeforeValidator, /openapi.json showed them as "ge"/"le" (not JSON Schema) next to the type.
Count = Annotated[int, annotated_types.Ge(1), annotated_types.Le(MAX_K)]
K = Annotated[Count, BeforeValidator(whole_number), Query(description="number of results")]
ItemId = Annotated[str, Path(description="item id as listed in search results (may contain '/')")]
KindFilter = Annotated[Kind | None, Query(description="only items of this kind")]
GroupFilter = Annotated[list[FilterValue] | None, Query(max_length=MAX_K, description="only items of these groups (video ids); repeatable")]
SourceFilter = Annotated[list[FilterValue] | None, Query(max_length=MAX_K, description=(
    "only items whose 'source' metadata is one of these values; repeatable (any of them). "
    "Metadata comes from `lookalike embed --metadata FILE`; an index without it matches nothing"))]
TagFilter = Annotated[list[FilterValue] | None, Query(max_length=MAX_K, description=(
    "only items whose 'tags' metadata list holds one of these tags; repeatable (any of them). "
    "Metadata comes from `lookalike embed --metadata FILE`; an index without it matches nothing"))]
PerGroup = Annotated[Count | None, BeforeValidator(whole_number), Query(description="at most this many results per group (video)")]

_BINARY = {"schema": {"type": "string", "format": "binary"}}
IMAGE_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "description": f"an image file, as multipart field {UPLOAD_FIELD!r} or as the raw request body",
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": [UPLOAD_FIELD], "properties": {UPLOAD_FIELD: _BINARY["schema"]}}
            },
            "image/*": _BINARY,
            "application/octet-stream": _BINARY,
        },
    }
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error responses carrying ``{"detail": "reason"}``; a 422's detail
    may instead be the list of invalid fields (``ValidationErrorMessage``)."""
    return {code: {"model": ValidationErrorMessage if code == 422 else ErrorMessage} for code in codes}


# A 503 while the first model and index load: when to ask again (the page's footer does).
LOADING_RETRY_AFTER_S = 2
RETRY_WHILE_LOADING = {"Retry-After": str(LOADING_RETRY_AFTER_S)}


async def get_backend(request: Request) -> Backend:
    """The Backend served right now (503 if none is loaded yet); a request keeps it to the end."""
    backend = request.app.state.slot.backend
    if backend is None:
        raise HTTPException(status_code=503, detail="the model and index are still loading", headers=RETRY_WHILE_LOADING)
    return backend


async def get_engine(request: Request) -> QueryEngine:
    """The app's query engine (async, like get_backend: FastAPI runs plain ``def`` dependencies in a thread)."""
    return request.app.state.engine


BackendDep = Annotated[Backend, Depends(get_backend)]
STRICT_QUERY = [Depends(no_unknown_query_params)]  # search and item endpoints: an unknown query parameter is a 422
EngineDep = Annotated[QueryEngine, Depends(get_engine)]
