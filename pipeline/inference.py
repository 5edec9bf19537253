"""Beam ``RunInference`` support for our Flax encoder.

``FlaxEncoderHandler`` is a Beam ``ModelHandler``: Beam loads the model once per
worker process (shared across its threads) through ``load_model``, batches examples
(``min_batch_size``/``max_batch_size``) and calls ``run_inference``; the encoder pads
every batch to a fixed bucket size so XLA compiles once per bucket. How many examples Beam
puts in one call and how many images go through one forward are separate: with pre-made
[B, H, W, C] batches Beam hands over one example per call (``max_batch_size=1``) while the
encoder still runs up to ``encoder_batch`` images per forward. Such a batch is dispatched
asynchronously (``Encoder.embed_async``): the inference is ready when converted with
``np.asarray``, which ``batches.BatchRowsFn`` does one batch later. The embed pipeline's
examples are ``ItemBatch`` (metas, pixels) and its results ``EmbeddedBatch`` (metas,
result), so the handler is keyed by the batch's metadata without Beam's
``KeyedModelHandler`` (which pickles every batch's keys to count their bytes).

A run on the in-process runner starts loading and compiling its encoder on a background
thread (``preload_encoder``) while it lists the corpus and builds the pipeline; the
handler's ``load_model`` in that process then takes it (``take_preloaded``) instead of
loading it a second time, so the first batch does not wait for the model.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from lookalike.model.artifact import Encoder, load_encoder
from lookalike.model.cpu_threads import limit_xla_cpu_threads
from lookalike.pipeline.elements import EmbeddedBatch, ItemBatch

log = logging.getLogger(__name__)

# Encoders being loaded in this process for a run about to start, by (model dir, encoder batch).
_preloads: dict[tuple[str, int], Future] = {}
_preloads_lock = threading.Lock()


def _load_and_compile(model_dir: str, encoder_batch: int) -> Encoder:
    encoder = load_encoder(model_dir, max_batch=encoder_batch)
    np.asarray(encoder.embed_async(np.zeros((1, *encoder.spec.shape), np.float32)))  # compiles the one batch shape
    return encoder


def preload_encoder(model_dir: str, encoder_batch: int) -> None:
    """Start loading and compiling the encoder on a background thread (at most one per key)."""
    key = (str(model_dir), int(encoder_batch))
    with _preloads_lock:
        if key in _preloads:
            return
        future: Future = Future()
        _preloads[key] = future

    def work() -> None:
        try:
            future.set_result(_load_and_compile(*key))
        except BaseException as e:  # the handler loads it again, and raises then
            future.set_exception(e)

    threading.Thread(target=work, name="preload-encoder", daemon=True).start()


def take_preloaded(model_dir: str, encoder_batch: int) -> Encoder | None:
    """The preloaded encoder for this key (waiting for it), or None if none was started or it failed."""
    with _preloads_lock:
        future = _preloads.pop((str(model_dir), int(encoder_batch)), None)
    if future is None:
        return None
    try:
        return future.result()
    except Exception as e:
        log.warning("preloading the encoder from %s failed (%s); loading it again", model_dir, e)
        return None


def discard_preloaded() -> int:
    """Forget every preload nobody took (a run that embedded nothing, or ran on other processes)."""
    with _preloads_lock:
        dropped = len(_preloads)
        _preloads.clear()
    return dropped


class FlaxEncoderHandler(ModelHandler[np.ndarray, PredictionResult, Encoder]):
    """Examples are [H, W, C] float32 images (inference [embed_dim]), pre-made batches
    [B, H, W, C] (inference [B, embed_dim]), or ``ItemBatch`` (metas, [B, H, W, C]) whose
    result is ``EmbeddedBatch`` (metas, PredictionResult with inference [B, embed_dim] and no
    example: nothing downstream needs the pixels again); all examples of a call go through
    one forward."""

    def __init__(self, model_dir: str, *, min_batch_size: int = 32, max_batch_size: int = 256,
                 encoder_batch: int | None = None, xla_cpu_threads: int | None = None):
        """``xla_cpu_threads``: size of XLA's CPU thread pool in each worker process that loads
        the model before anything else there starts JAX (``model.cpu_threads``); None keeps
        JAX's one thread per CPU."""
        super().__init__(min_batch_size=min_batch_size, max_batch_size=max_batch_size)
        self._model_dir = model_dir
        self._encoder_batch = encoder_batch or max_batch_size
        self._xla_cpu_threads = xla_cpu_threads

    def load_model(self) -> Encoder:
        if self._xla_cpu_threads is not None:
            limit_xla_cpu_threads(self._xla_cpu_threads)
        preloaded = take_preloaded(self._model_dir, self._encoder_batch)
        return preloaded if preloaded is not None else load_encoder(self._model_dir, max_batch=self._encoder_batch)

    def run_inference(
        self, batch: Sequence[np.ndarray | ItemBatch], model: Encoder, inference_args: dict[str, Any] | None = None
    ) -> Iterable[PredictionResult | EmbeddedBatch]:
        if batch and all(isinstance(x, ItemBatch) for x in batch):
            results = self.run_inference([x.pixels for x in batch], model, inference_args)
            return [EmbeddedBatch(x.metas, PredictionResult(None, r.inference, model_id=r.model_id))
                    for x, r in zip(batch, results)]
        if len(batch) == 1 and batch[0].ndim == 4 and len(batch[0]) <= model.max_batch:
            # One pre-made batch: dispatched without waiting (the inference is a PendingEmbeddings,
            # which np.asarray turns into [B, embed_dim]), so the caller decodes the next batch
            # while XLA computes this one; padded to encoder_batch, a single compiled shape.
            return [PredictionResult(batch[0], model.embed_async(batch[0]), model_id=model.version)]
        stacked = [x if x.ndim == 4 else x[None] for x in batch]
        embeddings = model.embed(np.concatenate(stacked))
        results, start = [], 0
        for example, part in zip(batch, stacked):
            emb = embeddings[start : start + len(part)]
            start += len(part)
            results.append(PredictionResult(example, emb if example.ndim == 4 else emb[0], model_id=model.version))
        return results

    def get_num_bytes(self, batch: Sequence[np.ndarray | ItemBatch]) -> int:
        return int(sum(x.pixels.nbytes if isinstance(x, ItemBatch) else x.nbytes for x in batch))

    def get_metrics_namespace(self) -> str:
        return "lookalike_flax_encoder"

    def update_model_path(self, model_path: str | None = None) -> None:
        if model_path:
            self._model_dir = model_path
