"""The HTTP API's request and response shapes (pydantic), which also make /openapi.json.

Results never carry the item's ``uri``: it is a path on the server's disk. Clients
get the id and a ``thumbnail_url`` served by id instead.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

MAX_K = 100
DEFAULT_K = 10
METADATA_DESCRIPTION = ("the item's user metadata without its nulls (`source`, `tags`, ...: from `lookalike embed "
                        "--metadata` or an upsert); null when it has none")
MAX_BATCH_QUERIES = 64
# Longest query vector accepted: checked before any element is, so a huge array is refused at once.
MAX_DIM = 8192
KINDS = ("image", "frame")
Kind = Literal["image", "frame"]
# A filter value: never empty (no group, source or tag is "": an empty value would match nothing).
FilterValue = Annotated[str, StringConstraints(min_length=1)]


class QueryEcho(BaseModel):
    """What was searched for, as the server understood it."""

    type: Literal["image", "vector", "item"]
    k: int
    filename: str | None = Field(None, description="uploaded file name (image queries)")
    bytes: int | None = Field(None, description="uploaded size in bytes (image queries)")
    dim: int | None = Field(None, description="vector length (vector queries)")
    id: str | None = Field(None, description="item id (similar-item queries)")
    kind: Kind | None = Field(None, description="only items of this kind were searched")
    group: list[str] | None = Field(None, description="only items of these groups (videos) were searched")
    source: list[str] | None = Field(None, description="only items of these sources were searched")
    tag: list[str] | None = Field(None, description="only items holding one of these tags were searched")
    max_per_group: int | None = Field(None, description="at most this many results per group (video)")


class SearchResult(BaseModel):
    id: str
    score: float = Field(description="cosine similarity, 1.0 is identical")
    distance: float = Field(description="L2 distance between unit embeddings, 0.0 is identical")
    same_item: bool | None = Field(description="distance is within the model's calibrated same-item threshold (learned on "
                                               "the training data: a query unlike the corpus can still be within it; not "
                                               "an out-of-distribution check); null when the model has no threshold "
                                               "(trained with nothing held out to calibrate one: val_fraction=0)")
    kind: Kind = Field(description="'image', or 'frame' of a video")
    timestamp_s: float | None = Field(None, description="position in a video; null for images")
    group: str | None = Field(None, description="the item's group: the video a frame comes from")
    thumbnail_url: str
    metadata: dict[str, Any] | None = Field(None, description=METADATA_DESCRIPTION)


class SearchResponse(BaseModel):
    query: QueryEcho
    results: list[SearchResult]
    model_version: str
    index_version: str
    note: str | None = Field(None, description="null, unless nothing was found because a filter names only values no "
                             "item has: then which (a group given without its folders: the group meant)")


class FilterFields(BaseModel):
    """Metadata filters and crowding, shared by the JSON search bodies. A field the API does not
    know (a typo such as ``kinds``) is a 422 error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", strict=True)  # strict: "k": true or "5" or 5.0 is an error, not 1 or 5

    kind: Kind | None = Field(None, description="only items of this kind ('image' or 'frame')")
    group: list[FilterValue] | None = Field(None, min_length=1, max_length=MAX_K, description="only items of these groups (video ids)")
    source: list[FilterValue] | None = Field(None, min_length=1, max_length=MAX_K, description=(
        "only items whose 'source' metadata is one of these values (from `lookalike embed --metadata FILE`; "
        "an index without it matches nothing)"))
    tag: list[FilterValue] | None = Field(None, min_length=1, max_length=MAX_K, description=(
        "only items whose 'tags' metadata list holds one of these tags (from `lookalike embed --metadata FILE`; "
        "an index without it matches nothing)"))
    max_per_group: int | None = Field(None, ge=1, le=MAX_K, description="at most this many results per group (video)")


MODEL_VERSION_FIELD = Field(
    None, description="the model that made the query embeddings (see /v1/info): a different one is a 409, not a "
                      "search in the wrong space")


class VectorQuery(FilterFields):
    vector: list[float] = Field(max_length=MAX_DIM, description="a query embedding of the index's dimension (see /v1/info)")
    k: int = Field(DEFAULT_K, ge=1, le=MAX_K)
    model_version: str | None = MODEL_VERSION_FIELD


class BatchQuery(BaseModel):
    """One query of a batch: exactly one of ``vector``, ``id`` or ``image_base64``. ``k`` and the
    filters are the batch's, for all its queries (given here they are a 422 error)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    vector: list[float] | None = Field(None, max_length=MAX_DIM, description="a query embedding of the index's dimension")
    id: str | None = Field(None, description="an indexed item id: items like it (itself excluded)")
    image_base64: str | None = Field(None, description="an image file, base64-encoded")

    @model_validator(mode="after")
    def exactly_one(self) -> "BatchQuery":
        given = [name for name in ("vector", "id", "image_base64") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of vector, id or image_base64 (got {', '.join(given) or 'none'})")
        return self


class BatchSearch(FilterFields):
    queries: list[BatchQuery] = Field(min_length=1, max_length=MAX_BATCH_QUERIES)
    k: int = Field(DEFAULT_K, ge=1, le=MAX_K)
    model_version: str | None = MODEL_VERSION_FIELD


class BatchSearchResponse(BaseModel):
    responses: list[SearchResponse] = Field(description="one response per query, in order")


class ItemMetadata(BaseModel):
    id: str
    kind: Kind = Field(description="'image', or 'frame' of a video")
    width: int | None = None
    height: int | None = None
    content_hash: str | None = None
    timestamp_s: float | None = None
    group: str | None = None
    thumbnail_url: str
    similar_url: str
    metadata: dict[str, Any] | None = Field(None, description=METADATA_DESCRIPTION)


class Info(BaseModel):
    model_version: str
    index_version: str
    item_count: int
    embed_dim: int
    image_size: int
    channels: int
    same_item_threshold: float | None = Field(description="L2 distance at or below which two images count as the same item")
    same_item_means: str = Field(description='what a distance within same_item_threshold means: "same class" for a model '
                                 'trained on labelled classes (the threshold is calibrated on held-out pairs of one class), '
                                 '"same image" for one trained --unlabelled (views of one image or video moment)')
    loaded_unix_s: float
    max_upload_bytes: int
    max_large_uploads: int = Field(0, description="request bodies over 1 MiB (large uploads) taken in at once; "
                                   "more wait their turn, a 503 after waiting too long")
    index_build: dict[str, Any] = Field(default_factory=dict, description="how the index was built (mode, parameters)")
    index_quality: dict[str, Any] = Field(default_factory=dict, description="recall measured when the index was built")
    last_reload_error: str | None = Field(None, description="why the newest CURRENT version was refused (the old one keeps serving)")
    last_reload_unix_s: float | None = None
    reload_count: int = Field(0, description="hot swaps since the server started")
    batching: dict[str, int | float] = Field(default_factory=dict, description="micro-batching limits (counts, milliseconds)")
    frame_count: int = Field(0, description="how many of the items are video frames (the rest are images)")
    example_item_id: str | None = Field(None, description="the id of one indexed item, to show as an example")


class ReloadResult(BaseModel):
    status: Literal["swapped", "unchanged"]
    index_version: str
    model_version: str
    seconds: float


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready"] = "ready"
    index_version: str


class ErrorMessage(BaseModel):
    detail: str


class ValidationIssue(BaseModel):
    """One reason a request was invalid, as FastAPI (pydantic) reports it."""

    type: str
    loc: list[str | int] = Field(description="where: 'body', 'query' or 'path', then field names and positions")
    msg: str
    input: Any = Field(None, description="the offending value (long values shortened)")
    ctx: dict[str, Any] | None = None


class ValidationErrorMessage(BaseModel):
    """A 422: a reason (a string) from the endpoint, or the list of what was invalid in the
    request (the first 10; ``error_count`` says how many there were)."""

    detail: str | list[ValidationIssue]
    error_count: int | None = Field(None, description="how many errors the request had (with a list)")
