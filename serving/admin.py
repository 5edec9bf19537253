"""Operator endpoints (``POST /v1/admin/reload``) and the store watcher behind hot swap.

Admin endpoints need ``Authorization: Bearer <token>`` matching the token the server
was given ($LOOKALIKE_ADMIN_TOKEN by default; compared in constant time). A server
without a token has them disabled (403 saying how to enable them), so a fresh
install never exposes them by accident.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request
from fastapi.concurrency import run_in_threadpool

from lookalike.serving.queries import no_unknown_query_params
from lookalike.serving.schemas import ErrorMessage, ReloadResult, ValidationErrorMessage
from lookalike.serving.swap import ReloadOutcome, without_store_root

log = logging.getLogger(__name__)

ADMIN_TOKEN_ENV = "LOOKALIKE_ADMIN_TOKEN"


@dataclass(frozen=True)
class AdminAuth:
    token: str | None

    @classmethod
    def from_env(cls, token: str | None = None) -> "AdminAuth":
        """``token``, else $LOOKALIKE_ADMIN_TOKEN; an empty token disables admin endpoints."""
        token = token if token is not None else os.environ.get(ADMIN_TOKEN_ENV)
        return cls(token or None)

    def check(self, authorization: str | None) -> None:
        """Raise 403 when admin endpoints are disabled, 401 when the bearer token is wrong."""
        if self.token is None:
            raise HTTPException(
                status_code=403,
                detail=f"admin endpoints are disabled: start the server with {ADMIN_TOKEN_ENV} set to a secret token",
            )
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise HTTPException(
                status_code=401,
                detail="admin endpoints need the header 'Authorization: Bearer <token>' with the server's admin token",
                headers={"WWW-Authenticate": "Bearer"},
            )


async def reload_app(app: FastAPI, force: bool) -> ReloadOutcome:
    """Run one reload attempt in a worker thread and update the metrics. ``force``: asked for
    (the admin endpoint); otherwise the watcher's periodic check, which is counted only when
    it swaps or refuses a version (not each time it finds CURRENT unchanged)."""
    outcome: ReloadOutcome = await run_in_threadpool(app.state.reloader.reload, app.state.slot, force)
    metrics = app.state.metrics
    if outcome.status in ("swapped", "refused") or (force and outcome.status == "unchanged"):
        metrics.reloads.labels(outcome.status).inc()
    if outcome.status == "swapped":
        backend = app.state.slot.backend
        metrics.served(backend.index.version, backend.encoder.version, len(backend.index))
    return outcome


async def watch_store(app: FastAPI, interval_s: float) -> None:
    """Every ``interval_s`` seconds, swap in the store's CURRENT version if it changed."""
    while True:
        await asyncio.sleep(interval_s)
        if app.state.slot.backend is None:
            continue  # the first load is still running
        try:
            await reload_app(app, force=False)
        except Exception:  # never let the watcher die; the next round tries again
            log.exception("checking the store for a new index failed")


admin_router = APIRouter(prefix="/v1/admin", tags=["admin"])


@admin_router.post(
    "/reload",
    response_model=ReloadResult,
    responses={**{code: {"model": ErrorMessage} for code in (401, 403, 404, 409)}, 422: {"model": ValidationErrorMessage}},
    dependencies=[Depends(no_unknown_query_params)],  # ?force=true is a 422, as on other endpoints
)
async def admin_reload(request: Request, authorization: Annotated[str | None, Header()] = None) -> ReloadResult:
    """Load the store's CURRENT version now and swap it in (409 with the reason if refused)."""
    app = request.app
    app.state.admin.check(authorization)
    if app.state.reloader is None:
        raise HTTPException(status_code=404, detail="this server was not started from a store: there is nothing to reload")
    if app.state.slot.backend is None:
        raise HTTPException(status_code=409, detail="the first model and index are still loading")
    outcome = await reload_app(app, force=True)
    if outcome.status not in ("swapped", "unchanged"):
        reason = without_store_root(outcome.error, app.state.reloader.store.root) if outcome.error else "reload refused"
        raise HTTPException(status_code=409, detail=reason)  # paths in the store relative to it, as /v1/info gives them
    return ReloadResult(
        status=outcome.status, index_version=outcome.index_version, model_version=outcome.model_version,
        seconds=round(outcome.seconds, 3),
    )
