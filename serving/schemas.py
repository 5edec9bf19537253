"""The HTTP API's request and response shapes (pydantic), which also make /openapi.json.

Results never carry the item's ``uri``: it is a path on the server's disk. Clients
get the id and a ``thumbnail_url`` served by id instead.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

MAX_K = 100
DEFAULT_K = 10


class QueryEcho(BaseModel):
    """What was searched for, as the server understood it."""

    type: Literal["image", "vector", "item"]
    k: int
    filename: str | None = Field(None, description="uploaded file name (image queries)")
    bytes: int | None = Field(None, description="uploaded size in bytes (image queries)")
    dim: int | None = Field(None, description="vector length (vector queries)")
    id: str | None = Field(None, description="item id (similar-item queries)")


class SearchResult(BaseModel):
    id: str
    score: float = Field(description="cosine similarity, 1.0 is identical")
    distance: float = Field(description="L2 distance between unit embeddings, 0.0 is identical")
    same_item: bool = Field(description="distance is within the model's calibrated same-item threshold")
    kind: str
    timestamp_s: float | None = Field(None, description="position in a video; null for images")
    thumbnail_url: str


class SearchResponse(BaseModel):
    query: QueryEcho
    results: list[SearchResult]
    model_version: str
    index_version: str


class VectorQuery(BaseModel):
    vector: list[float] = Field(description="a query embedding of the index's dimension (see /v1/info)")
    k: int = Field(DEFAULT_K, ge=1, le=MAX_K)


class ItemMetadata(BaseModel):
    id: str
    kind: str
    width: int | None = None
    height: int | None = None
    content_hash: str | None = None
    timestamp_s: float | None = None
    thumbnail_url: str
    similar_url: str


class Info(BaseModel):
    model_version: str
    index_version: str
    item_count: int
    embed_dim: int
    image_size: int
    channels: int
    same_item_threshold: float | None = Field(description="L2 distance at or below which two images count as the same item")
    loaded_unix_s: float
    max_upload_bytes: int


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class ErrorMessage(BaseModel):
    detail: str
