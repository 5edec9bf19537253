"""The model artifact: what ``train`` writes and what pipeline and server load.

``models/<version>/`` holds ``model.json`` (config, preprocessing spec, embed_dim,
same-item threshold, metrics, version) and ``params/`` (an orbax checkpoint). The
version is a content hash of config and parameters, so the same weights always get
the same name. ``load_encoder(path)`` returns an ``Encoder`` whose jitted batch
embed pads to a few fixed batch sizes, so XLA compiles a handful of times at most. With
several local devices (GPUs, TPU cores) the encoder is data-parallel: parameters are
replicated and every padded batch is split over all of them (``jax.sharding``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lookalike.model.checkpoints import error_summary
from lookalike.model.config import TrainConfig, config_from_dict, config_to_dict
from lookalike.model.encoder import EncoderModule, encoder_class
from lookalike.model.memory import keep_freed_memory
from lookalike.model.metrics import json_ready
from lookalike.model.preprocess import PreprocessSpec, decode_image

log = logging.getLogger(__name__)

MODEL_JSON = "model.json"
FORMAT = "lookalike-model/1"


def params_hash(state: Any, config: TrainConfig) -> str:
    """Hex sha256 over the config and every parameter array (in tree order)."""
    h = hashlib.sha256(json.dumps(config_to_dict(config), sort_keys=True).encode())
    for leaf in jax.tree_util.tree_leaves(state):
        arr = np.asarray(leaf)
        h.update(str(arr.shape).encode() + str(arr.dtype).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def save_model(
    model: EncoderModule,
    config: TrainConfig,
    spec: PreprocessSpec,
    models_dir: Path,
    *,
    threshold: float | None,
    metrics: dict[str, Any],
    extra_files: dict[str, Path] | None = None,
) -> str:
    """Write the artifact under ``models_dir/<version>`` atomically; return the version."""
    state = jax.device_get(nnx.state(model))
    version = "m-" + params_hash(state, config)[:12]
    final = models_dir / version
    if (final / MODEL_JSON).is_file():
        log.info("model %s already exists (same weights); keeping it", version)
        return version
    tmp = models_dir / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp.absolute() / "params", state)
            ckptr.wait_until_finished()
        for name, src in (extra_files or {}).items():
            if Path(src).is_file():
                shutil.copyfile(src, tmp / name)
        meta = {
            "format": FORMAT,
            "version": version,
            "created_unix_s": time.time(),
            "architecture": type(model).__name__,
            "embed_dim": config.embed_dim,
            "config": config_to_dict(config),
            "preprocess": spec.to_dict(),
            "same_item_threshold": threshold,
            "metrics": metrics,
        }
        (tmp / MODEL_JSON).write_text(json.dumps(json_ready(meta), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return version


def _bucket_sizes(max_batch: int, num_devices: int = 1) -> list[int]:
    """Padded batch sizes 1, 4, 16, ... up to ``max_batch``, each rounded up to a multiple of
    ``num_devices`` (so a batch splits evenly over the devices)."""
    sizes, s = [], 1
    while s < max_batch:
        sizes.append(s)
        s *= 4
    return sorted({-(-b // num_devices) * num_devices for b in sizes + [max_batch]})


def _as_array(values: np.ndarray) -> np.ndarray:
    return values


class PendingEmbeddings:
    """Embeddings being computed (``Encoder.embed_async``): ``np.asarray(pending)`` waits and
    returns [N, embed_dim] float32; pickling waits too and gives the numpy array."""

    def __init__(self, padded: jax.Array, n: int):
        self._padded = padded
        self._n = n

    def __len__(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        """Bytes of the [N, embed_dim] float32 result, known without waiting for it."""
        return self._n * int(np.prod(self._padded.shape[1:])) * 4

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        values = np.asarray(self._padded)[: self._n]
        return values if dtype is None else values.astype(dtype, copy=False)

    def __reduce__(self):
        return _as_array, (np.asarray(self),)


class Encoder:
    """A loaded model: ``embed`` [N, H, W, C] float32 -> [N, embed_dim] float32 unit vectors.

    Runs on every local device of the default backend (``devices``): one device as is;
    several (GPUs, TPU cores, or CPU devices simulated with
    ``XLA_FLAGS=--xla_force_host_platform_device_count=N``) data-parallel, the parameters
    replicated and each padded batch split over a 1-D ``data`` mesh.
    """

    def __init__(self, model: EncoderModule, meta: dict[str, Any], max_batch: int = 256,
                 devices: list[Any] | None = None):
        self.meta = meta
        self.version: str = meta["version"]
        self.embed_dim: int = int(meta["embed_dim"])
        self.spec = PreprocessSpec.from_dict(meta["preprocess"])
        self.same_item_threshold: float | None = meta.get("same_item_threshold")
        # What a distance within it means: the held-out pairs it was calibrated on (F1-best).
        self.same_item_means: str = "same image" if (meta.get("config") or {}).get("unlabelled") else "same class"
        self.max_batch = max_batch
        self.devices = list(devices or jax.local_devices())
        self._buckets = _bucket_sizes(max_batch, len(self.devices))
        graphdef, state = nnx.split(model)

        def forward(state, x):
            return nnx.merge(graphdef, state)(x)

        if len(self.devices) == 1:
            self._state = jax.device_put(state, self.devices[0])
            self._forward = jax.jit(forward)
        else:
            mesh = Mesh(np.asarray(self.devices), ("data",))
            replicated, split = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
            self._state = jax.device_put(state, replicated)
            self._forward = jax.jit(forward, in_shardings=(replicated, split), out_shardings=split)
            log.info("encoder %s runs data-parallel on %d devices (%s)", self.version, len(self.devices),
                     self.devices[0].platform)

    def embed(self, images: np.ndarray) -> np.ndarray:
        """[N, H, W, C] float32 in [0, 1] -> [N, embed_dim] float32 (N may be 0)."""
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1:] != self.spec.shape:
            raise ValueError(f"expected [N, {', '.join(map(str, self.spec.shape))}] images, got {images.shape}")
        out = np.empty((len(images), self.embed_dim), np.float32)
        for start in range(0, len(images), self.max_batch):
            chunk = images[start : start + self.max_batch]
            size = next(b for b in self._buckets if b >= len(chunk))
            padded = np.zeros((size, *self.spec.shape), np.float32)
            padded[: len(chunk)] = chunk
            out[start : start + len(chunk)] = np.asarray(self._forward(self._state, padded))[: len(chunk)]
        return out

    def embed_async(self, images: np.ndarray) -> "PendingEmbeddings":
        """Start embedding [N, H, W, C] float32 images, N <= ``max_batch``, padded to the
        largest bucket (``max_batch``, rounded up to a multiple of the device count: one
        compiled shape), and return at once: JAX dispatches the forward
        asynchronously, so the caller can prepare the next batch while XLA computes this one.
        ``np.asarray(result)`` waits for and returns the [N, embed_dim] embeddings. XLA reads a
        full float32 batch in place, so the caller must not modify ``images`` before then."""
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1:] != self.spec.shape or len(images) > self.max_batch:
            raise ValueError(f"expected [N <= {self.max_batch}, {', '.join(map(str, self.spec.shape))}] images, "
                             f"got {images.shape}")
        n = len(images)
        if n < self._buckets[-1]:
            padded = np.zeros((self._buckets[-1], *self.spec.shape), np.float32)
            padded[:n] = images
            images = padded
        # The numpy batch goes to the jitted forward as is: jnp.asarray would copy it on XLA's
        # thread pool first, which waits behind the forward of the previous batch (tens of ms).
        return PendingEmbeddings(self._forward(self._state, images), n)

    def warm_up(self, up_to: int) -> list[int]:
        """Compile the forward for every padded batch size a batch of at most ``up_to`` images
        can use, so no live query pays for an XLA compile; returns those sizes."""
        sizes = [b for b in self._buckets if b <= up_to] + [next(b for b in self._buckets if b >= min(up_to, self.max_batch))]
        for size in sorted(set(sizes)):
            self.embed(np.zeros((size, *self.spec.shape), np.float32))
        return sorted(set(sizes))

    def preprocess(self, data: bytes) -> np.ndarray:
        """Image file bytes -> [H, W, C] float32 model input (ImageDecodeError if unusable)."""
        return decode_image(data, self.spec)

    def embed_bytes(self, blobs: list[bytes]) -> np.ndarray:
        """Image file bytes -> [N, embed_dim]; raises ImageDecodeError on the first bad one."""
        return self.embed(np.stack([self.preprocess(b) for b in blobs]) if blobs else np.zeros((0, *self.spec.shape), np.float32))


def read_model_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    meta_path = path / MODEL_JSON
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a lookalike model: {MODEL_JSON} is missing")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:  # a corrupt or truncated file
        raise ValueError(f"{meta_path} is not a valid model description (not JSON: {e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ValueError(f"{meta_path} is not a valid model description (no \"config\" object in it)")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: unsupported model format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_model(path: str | Path) -> tuple[EncoderModule, dict[str, Any]]:
    """Load ``models/<version>/`` as the trainable module and its metadata."""
    path = Path(path).absolute()
    meta = read_model_meta(path)
    config = config_from_dict(meta["config"])
    cls = encoder_class(config)
    abstract = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    with ocp.StandardCheckpointer() as ckptr:
        try:
            state = ckptr.restore(path / "params", abstract_state)
        except Exception as e:  # missing, truncated or corrupt weights: say which model and why, in one line
            raise ValueError(f"the weights of model {path.name} ({path / 'params'}) cannot be read: "
                             f"{error_summary(e)}") from None
    return nnx.merge(graphdef, state), meta


def load_encoder(path: str | Path, max_batch: int = 256) -> Encoder:
    """Load ``models/<version>/`` into an Encoder ready to embed (malloc set to keep freed
    memory: ``memory.keep_freed_memory``)."""
    keep_freed_memory()
    model, meta = load_model(path)
    return Encoder(model, meta, max_batch=max_batch)
