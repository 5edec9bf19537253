"""The Siamese tower: a conv net whose L2-normalised output is the embedding.

Both images of a pair go through the same module (shared weights); the distance of
their embeddings is what the losses train. ``config.architecture`` picks the small
``ConvEncoder`` (conv + pool layers, a hidden dense layer) or the ``ResNetEncoder``
(residual blocks with GroupNorm, which has no batch statistics, so the module has
only parameters and data-parallel steps stay exact).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from lookalike.model.config import TrainConfig


class ConvEncoder(nnx.Module):
    """[N, H, W, C] float32 images in [0, 1] -> [N, embed_dim] unit-norm embeddings."""

    def __init__(self, config: TrainConfig, *, rngs: nnx.Rngs):
        self.convs = nnx.List()
        in_ch = config.channels
        for width in config.conv_widths:
            self.convs.append(nnx.Conv(in_ch, width, kernel_size=(3, 3), rngs=rngs))
            in_ch = width
        side = config.image_size
        for _ in config.conv_widths:
            side = max(1, side // 2)
        self.hidden = nnx.Linear(side * side * in_ch, config.hidden_dim, rngs=rngs)
        self.out = nnx.Linear(config.hidden_dim, config.embed_dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = (x - 0.5) * 2.0
        for conv in self.convs:
            x = nnx.relu(conv(x))
            x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.hidden(x))
        return l2_normalize(self.out(x))


class ResidualBlock(nnx.Module):
    """Two 3x3 convs with GroupNorm and a (projected when the shape changes) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(in_ch, out_ch, (3, 3), strides=(stride, stride), use_bias=False, rngs=rngs)
        self.norm1 = nnx.GroupNorm(out_ch, num_groups=_groups(out_ch), rngs=rngs)
        self.conv2 = nnx.Conv(out_ch, out_ch, (3, 3), use_bias=False, rngs=rngs)
        self.norm2 = nnx.GroupNorm(out_ch, num_groups=_groups(out_ch), rngs=rngs)
        self.project = (
            nnx.Conv(in_ch, out_ch, (1, 1), strides=(stride, stride), use_bias=False, rngs=rngs)
            if stride != 1 or in_ch != out_ch else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        shortcut = self.project(x) if self.project is not None else x
        return nnx.relu(y + shortcut)


def _groups(channels: int) -> int:
    for g in (8, 4, 2):
        if channels % g == 0:
            return g
    return 1


class ResNetEncoder(nnx.Module):
    """[N, H, W, C] float32 in [0, 1] -> [N, embed_dim] unit-norm embeddings.

    A 3x3 stem of ``resnet_widths[0]`` channels, then per width one stage of
    ``resnet_blocks`` residual blocks (the first block of every stage after the first
    halves the resolution), global average pooling and a dense layer.
    """

    def __init__(self, config: TrainConfig, *, rngs: nnx.Rngs):
        widths = config.resnet_widths
        self.stem = nnx.Conv(config.channels, widths[0], (3, 3), use_bias=False, rngs=rngs)
        self.stem_norm = nnx.GroupNorm(widths[0], num_groups=_groups(widths[0]), rngs=rngs)
        self.blocks = nnx.List()
        in_ch = widths[0]
        for stage, width in enumerate(widths):
            for b in range(config.resnet_blocks):
                stride = 2 if stage > 0 and b == 0 else 1
                self.blocks.append(ResidualBlock(in_ch, width, stride, rngs=rngs))
                in_ch = width
        self.out = nnx.Linear(in_ch, config.embed_dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = (x - 0.5) * 2.0
        x = nnx.relu(self.stem_norm(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return l2_normalize(self.out(jnp.mean(x, axis=(1, 2))))


EncoderModule = ConvEncoder | ResNetEncoder


def encoder_class(config: TrainConfig) -> type[ConvEncoder] | type[ResNetEncoder]:
    """The module class ``config.architecture`` names."""
    if config.architecture == "conv":
        return ConvEncoder
    if config.architecture == "resnet":
        return ResNetEncoder
    raise ValueError(f"config architecture={config.architecture!r}: choose 'conv' or 'resnet'")


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows of ``x`` scaled to unit L2 norm (zero rows stay finite)."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


# Compiled initialisers by (module class, repr of the config): a second encoder of the same
# config (another seed, a test, a warm start) is not compiled again.
_INITIALIZERS: dict[tuple[type, str], tuple[nnx.GraphDef, Callable[[jax.Array], nnx.State]]] = {}
_INITIALIZERS_MAX = 16
# XLA optimises a program for its speed at run time; an initialiser runs once. Initialising
# op by op (as nnx modules do outside jit) compiled the partitionable threefry RNG once per
# parameter shape, at full optimisation: 7-18 s for one encoder on the 2-core VM, in every
# process that trains. One program at optimisation level 0: 1.5-6 s, same values (to 1e-7).
_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def _initializer(cls: type[EncoderModule], config: TrainConfig) -> tuple[nnx.GraphDef, Callable[[jax.Array], nnx.State]]:
    """(graph of the module, jitted PRNG key -> its freshly initialised state) for ``config``."""
    key = (cls, repr(config))
    if key not in _INITIALIZERS:
        graphdef = nnx.split(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0))))[0]
        init = jax.jit(lambda rng_key: nnx.state(cls(config, rngs=nnx.Rngs(rng_key))),
                       compiler_options=_INIT_COMPILER_OPTIONS)
        while len(_INITIALIZERS) >= _INITIALIZERS_MAX:
            _INITIALIZERS.pop(next(iter(_INITIALIZERS)))
        _INITIALIZERS[key] = graphdef, init
    return _INITIALIZERS[key]


def create_encoder(config: TrainConfig, seed: int | None = None) -> EncoderModule:
    """A freshly initialised encoder of ``config.architecture`` (the same parameters as
    constructing the module with ``nnx.Rngs(seed)``, default ``config.seed``), initialised by one
    compiled program (``_initializer``)."""
    graphdef, init = _initializer(encoder_class(config), config)
    return nnx.merge(graphdef, init(jax.random.key(config.seed if seed is None else seed)))
