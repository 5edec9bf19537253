"""A small Python client for the HTTP API, and the text table ``lookalike query`` prints.

Every method returns the decoded JSON response. A 4xx/5xx answer raises
``ClientError`` carrying the status and the server's own reason; a server that
cannot be reached raises ``ClientError`` with status ``None`` and a hint to start it.
A server address without a scheme (``127.0.0.1:8765``) means ``http://``; query
vectors must hold finite numbers (ValueError naming the first that is not).
"""

from __future__ import annotations

import base64
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

log = logging.getLogger(__name__)


class ClientError(RuntimeError):
    """The request failed; ``status`` is the HTTP status (None if there was no answer)."""

    def __init__(self, status: int | None, message: str):
        super().__init__(f"HTTP {status}: {message}" if status is not None else message)
        self.status = status
        self.message = message


# The least wait between two asks, whatever Retry-After says (a proxy may send 0).
MIN_RETRY_WAIT_S = 0.5


def retry_after_s(response: httpx.Response) -> float | None:
    """The seconds a 503 asks to wait before asking again (``Retry-After`` in seconds, at least
    ``MIN_RETRY_WAIT_S``), else None."""
    value = response.headers.get("retry-after", "").strip() if response.status_code == 503 else ""
    return max(MIN_RETRY_WAIT_S, float(value)) if re.fullmatch(r"[0-9]{1,6}", value) else None


def error_message(response: httpx.Response) -> str:
    """The server's reason: FastAPI's ``detail`` (a string or a list of validation errors)."""
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = None
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):  # request validation errors
        return "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', [])[1:]) or 'request'}: {err.get('msg')}" for err in detail
        )
    return response.text.strip() or response.reason_phrase


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def server_url(url: str) -> str:
    """``url`` as the base URL of a server: ``http://`` is assumed when it has no scheme
    (``127.0.0.1:8765``, ``localhost:8765/``), the trailing ``/`` dropped. ValueError for
    an empty address or a scheme other than http and https."""
    text = url.strip()
    if not text:
        raise ValueError("the server address is empty: give one such as http://127.0.0.1:8765")
    if not _SCHEME.match(text):
        text = "http://" + text
    scheme = text.split("://", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"the server address {url!r} has scheme {scheme}://: only http:// and https:// are served")
    text = text.rstrip("/")
    try:
        parsed = httpx.URL(text)
    except (httpx.InvalidURL, ValueError) as e:  # a port that is not a number, a malformed host
        raise ValueError(f"the server address {url!r} is not a valid URL: {e}") from None
    if not parsed.host:
        raise ValueError(f"the server address {url!r} names no host: give one such as http://127.0.0.1:8765")
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        root = f"{parsed.scheme}://{parsed.netloc.decode('ascii')}"
        raise ValueError(f"the server address {url!r} has a path or query: give the server's root ({root}); "
                         "the endpoints' paths are added to it")
    return text


def finite_vector(vector: Sequence[float], what: str = "vector") -> list[float]:
    """``vector`` as a list of floats; ValueError naming ``what`` and the position (from 0)
    of the first value that is NaN or infinite, which JSON cannot carry."""
    values = [float(v) for v in vector]
    for at, value in enumerate(values):
        if not math.isfinite(value):
            raise ValueError(f"{what} value {value} at position {at} is not a finite number (NaN and infinity are not allowed)")
    return values


def parse_vector(text: str, what: str = "vector") -> list[float]:
    """Comma-separated numbers (``0.1,-0.2,3e-2``) as a query vector; ValueError naming
    ``what`` for text that is not one or for a value that is NaN or infinite."""
    values = []
    for at, token in enumerate(text.split(",")):
        try:
            values.append(float(token))
        except ValueError:
            shown = repr(token) if len(token) <= 40 else repr(token[:40]) + "..."
            raise ValueError(f"{what} expects comma-separated numbers: value {at} is {shown}"
                             f"{' (an empty value: a stray comma?)' if not token.strip() else ''}") from None
    return finite_vector(values, what)


class SearchClient:
    """Talks to a running ``lookalike serve`` at ``base_url`` (no scheme: ``http://``)."""

    def __init__(self, base_url: str, timeout_s: float = 30.0, retry_busy_s: float = 0.0):
        """``retry_busy_s``: for this long, a 503 with ``Retry-After`` (the server still loading
        its model and index, or busy with large uploads) is asked again after the wait it names."""
        if not (retry_busy_s >= 0 and math.isfinite(retry_busy_s)):
            raise ValueError(f"retry_busy_s must be a finite number of seconds >= 0, got {retry_busy_s!r}")
        self.base_url = server_url(base_url)
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s)
        self.retry_busy_s = retry_busy_s

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "SearchClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        deadline = time.monotonic() + self.retry_busy_s
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as e:
                raise ClientError(
                    None,
                    f"cannot reach the server at {self.base_url} ({type(e).__name__}: {e}); "
                    "is `lookalike serve` running there?",
                ) from None
            wait_s = retry_after_s(response)
            if wait_s is None or time.monotonic() + wait_s > deadline:
                break
            log.info("%s (HTTP 503): asking again in %g s", error_message(response), wait_s)
            time.sleep(wait_s)
        if response.is_error:
            raise ClientError(response.status_code, error_message(response))
        return response.json()

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/healthz")

    def info(self) -> dict[str, Any]:
        return self._request("GET", "/v1/info")

    def search_image(self, image: str | os.PathLike | bytes, k: int = 10, **filters: Any) -> dict[str, Any]:
        """Search by an image file (path) or its bytes; ``filters``: kind, group, source and tag (lists), max_per_group."""
        name, data = read_image(image)
        files = {"file": (name, data, "application/octet-stream")}
        return self._request("POST", "/v1/search/image", params=query_params(k, filters), files=files)

    def search_vector(self, vector: Sequence[float], k: int = 10, *, model_version: str | None = None,
                      **filters: Any) -> dict[str, Any]:
        """Search by an embedding; ``model_version``, the model that made it, makes the server
        answer 409 (``ClientError``) rather than search another model's space after a swap."""
        body = {"vector": finite_vector(vector), "k": k, **json_filters(filters), **model_of(model_version)}
        return self._request("POST", "/v1/search/vector", json=body)

    def similar(self, item_id: str, k: int = 10, **filters: Any) -> dict[str, Any]:
        """Items like the indexed item ``item_id`` (itself excluded); ``filters`` as ``search_image``'s."""
        return self._request("GET", f"/v1/items/{quote(item_id, safe='')}/similar", params=query_params(k, filters))

    def search_batch(
        self,
        *,
        vectors: Sequence[Sequence[float]] = (),
        ids: Sequence[str] = (),
        images: Sequence[str | os.PathLike | bytes] = (),
        k: int = 10,
        model_version: str | None = None,
        **filters: Any,
    ) -> list[dict[str, Any]]:
        """Several queries in one call: responses for the vectors, then the ids, then the images
        (``model_version``: as ``search_vector``'s, for the vectors)."""
        queries: list[dict[str, Any]] = [{"vector": finite_vector(vector, f"vectors[{i}]")} for i, vector in enumerate(vectors)]
        queries += [{"id": item_id} for item_id in ids]
        queries += [{"image_base64": base64.b64encode(read_image(image)[1]).decode("ascii")} for image in images]
        body = {"queries": queries, "k": k, **json_filters(filters), **model_of(model_version)}
        return self._request("POST", "/v1/search/batch", json=body)["responses"]

    def reload(self, admin_token: str) -> dict[str, Any]:
        """Ask the server to load the store's CURRENT index now (admin token required)."""
        return self._request("POST", "/v1/admin/reload", headers={"Authorization": f"Bearer {admin_token}"})

    def item(self, item_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/items/{quote(item_id, safe='')}")


SEARCH_FILTERS = ("kind", "group", "source", "tag", "max_per_group")


LIST_FILTERS = ("group", "source", "tag")  # any of several values: one value may be given alone


def drop_none(filters: dict[str, Any]) -> dict[str, Any]:
    """``filters`` without the None values; TypeError naming any that is no search filter."""
    unknown = set(filters) - set(SEARCH_FILTERS)
    if unknown:
        raise TypeError(f"unknown search filter(s) {sorted(unknown)}: use {', '.join(SEARCH_FILTERS)}")
    return {key: value for key, value in filters.items() if value is not None}


def json_filters(filters: dict[str, Any]) -> dict[str, Any]:
    """``filters`` as a JSON body takes them: a single group, source or tag (``tag="cat"``) as a
    one-value list, as the query string of an image or similar-item search takes it."""
    body = drop_none(filters)
    for key in LIST_FILTERS:
        if key in body:
            body[key] = [body[key]] if isinstance(body[key], str) else list(body[key])
    return body


def model_of(model_version: str | None) -> dict[str, str]:
    """The ``model_version`` field of a JSON search body, when one is given."""
    return {} if model_version is None else {"model_version": model_version}


def query_params(k: int, filters: dict[str, Any]) -> list[tuple[str, Any]]:
    params: list[tuple[str, Any]] = [("k", k)]
    for key, value in drop_none(filters).items():
        params += [(key, v) for v in value] if isinstance(value, (list, tuple)) else [(key, value)]
    return params


def read_image(image: str | os.PathLike | bytes) -> tuple[str, bytes]:
    """(file name, bytes) of a query image given as a path or as bytes."""
    if isinstance(image, bytes):
        return "query", image
    path = Path(image)
    try:
        return path.name, path.read_bytes()
    except OSError as e:
        raise ClientError(None, f"cannot read query image {path}: {e.strerror or e}") from None


def describe_query(query: dict[str, Any]) -> str:
    kind = query.get("type")
    if kind == "image":
        return f"image {query.get('filename') or '(bytes)'} ({query.get('bytes')} bytes)"
    if kind == "item":
        return f"items like {query.get('id')}"
    return f"vector of {query.get('dim')} values"


def describe_metadata(metadata: dict[str, Any] | None) -> str:
    """An item's metadata in a few words, as the web page shows it: its source, then its
    tags as ``#tag``, then any other field as ``name=value`` ("" for none)."""
    shown, others = [], []
    for name, value in (metadata or {}).items():
        if value is None or value == [] or value == "":
            continue
        if name == "source":
            shown.insert(0, str(value))
        elif name == "tags" and isinstance(value, list):
            shown += [f"#{tag}" for tag in value]
        else:
            others.append(f"{name}={','.join(map(str, value)) if isinstance(value, list) else value}")
    return " ".join(shown + others)


def shown_id(item_id: str) -> str:
    """``item_id`` as one table cell: quoted (Python's escapes) when it holds a control character
    such as a newline, or spaces at either end, which would break the row or vanish in it."""
    if item_id != item_id.strip() or any(not c.isprintable() for c in item_id):
        return repr(item_id)
    return item_id


def format_results(response: dict[str, Any]) -> str:
    """A search response as a text table, best match first; a video time column when there
    are frames, a metadata column (source, #tags, ...) when any result has metadata."""
    results = response.get("results", [])
    lines = [
        f"{describe_query(response.get('query', {}))}, k={response.get('query', {}).get('k')}: "
        f"{len(results)} result(s) from model {response.get('model_version')}, index {response.get('index_version')}"
    ]
    if not results:
        return lines[0] + (f"\nnote: {response['note']}" if response.get("note") else "")
    ids = [shown_id(r["id"]) for r in results]
    width = max(len("id"), *(len(i) for i in ids))
    frames = any(r.get("timestamp_s") is not None for r in results)  # a video time column only when there are frames
    metadata = [describe_metadata(r.get("metadata")) for r in results]
    with_metadata = any(metadata)  # a metadata column only when some result has metadata
    lines.append(f"{'#':>3}  {'id':<{width}}  {'score':>7}  {'distance':>8}  {'same item':<9}" + ("  video time" if frames else "")
                 + ("  metadata" if with_metadata else ""))
    for rank, (r, item_id, meta) in enumerate(zip(results, ids, metadata), 1):
        same = {True: "yes", None: "unknown"}.get(r.get("same_item"), "-")  # null: the model has no threshold
        when = f"  {r['timestamp_s']:>9.2f}s" if r.get("timestamp_s") is not None else ("  " + " " * 10 if frames else "")
        about = f"  {meta or '-'}" if with_metadata else ""
        lines.append(f"{rank:>3}  {item_id:<{width}}  {r['score']:>7.4f}  {r['distance']:>8.4f}  {same:<9}{when}{about}".rstrip())
    return "\n".join(lines)
