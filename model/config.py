"""Training configuration as code: one dataclass, one preset per use, CLI overrides.

``get_config("digits")`` is the default used by ``lookalike demo``; ``tiny`` keeps
tests fast; ``omniglot`` (28x28 grayscale characters, 4-layer conv net, semi-hard
triplets) and ``photos`` (32x32 RGB, ResNet) are starting points for real data.
``apply_overrides(config, ["num_steps=200"])`` is what ``--set`` does. Every field
added since the first release has a default equal to the old behaviour, so older
``model.json`` files load unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lookalike.model.augment import AugmentSpec


@dataclass(frozen=True)
class TrainConfig:
    # Input and preprocessing (recorded in the model artifact).
    image_size: int = 16
    channels: int = 1
    # Encoder: one shared-weight tower, L2-normalised output. "conv": conv_widths
    # conv+pool layers then a hidden dense layer; "resnet": a stem then one stage of
    # resnet_blocks residual blocks per entry of resnet_widths (stride 2 from the
    # second stage), global average pooling, a dense embedding.
    architecture: str = "conv"
    conv_widths: tuple[int, ...] = (32, 64, 64)
    hidden_dim: int = 128
    resnet_widths: tuple[int, ...] = (32, 64, 128)
    resnet_blocks: int = 1
    embed_dim: int = 32
    # Loss. "contrastive" on balanced pairs: L = Y*D^2 + (1-Y)*max(margin - D, 0)^2.
    # "triplet" on P x K batches (pk_classes classes, pk_images images each) with
    # in-batch mining "batch_all" | "batch_hard" | "semi_hard".
    loss: str = "contrastive"
    mining: str = "semi_hard"
    margin: float = 1.0
    pk_classes: int = 32
    pk_images: int = 4
    # Optimiser: AdamW with warm-up and cosine decay.
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    # Loop.
    batch_pairs: int = 128
    num_steps: int = 400
    eval_every_steps: int = 100
    log_every_steps: int = 50
    val_fraction: float = 0.2
    seed: int = 0
    # Stop after this many minutes of training even if num_steps is not reached (0: no
    # limit); the final step is evaluated and checkpointed as usual.
    max_train_minutes: float = 0.0
    # Orbax checkpoint of the training state every N steps (0: at every evaluation), and at
    # least every 5 minutes (train.CHECKPOINT_EVERY_S); a rerun of the same training resumes
    # from the last one.
    checkpoint_every_steps: int = 0
    # Batches assembled ahead of the step on a background thread.
    prefetch_batches: int = 2
    # Random distortions of training images (lookalike.model.augment; 0 / 1.0 / false
    # switch a part off): translation and zoom as fractions of the side, rotation and
    # shear in degrees, random-resized-crop minimum area, left-right flip, colour jitter.
    augment_shift: float = 0.0
    augment_scale: float = 0.0
    augment_rotate_deg: float = 0.0
    augment_shear_deg: float = 0.0
    augment_crop_area: float = 1.0
    augment_flip: bool = False
    augment_jitter: float = 0.0
    # Training without labels (lookalike.model.unlabelled): folder labels are ignored,
    # each image is its own class and each window of video_window_s seconds of a video
    # (frames every video_frame_interval_s, a new window at a shot change) is one; the
    # positives are augmented views (augment_* if set, else augment.UNLABELLED_VIEWS).
    unlabelled: bool = False
    video_window_s: float = 1.0
    video_frame_interval_s: float = 0.25
    extra: dict[str, Any] = field(default_factory=dict)


# Omniglot characters at 28x28 (the Vinyals et al. size): four 64-channel conv+pool
# layers (the Prototypical Networks backbone), semi-hard triplets on P x K batches. On
# this 2-core CPU it trains at ~1,500 images/s, 3x a ResNet of (32, 64, 128), and reached Lake's
# 20-way 1-shot 93.8 % after 3,000 steps (bench/model.py). The step count is a
# placeholder; bench/model.py sets it from a time budget.
_OMNIGLOT = TrainConfig(
    image_size=28,
    architecture="conv",
    conv_widths=(64, 64, 64, 64),
    hidden_dim=256,
    resnet_widths=(32, 64, 128),
    resnet_blocks=1,
    embed_dim=64,
    loss="triplet",
    mining="semi_hard",
    margin=0.5,
    pk_classes=32,
    pk_images=4,
    learning_rate=2e-3,
    warmup_steps=200,
    num_steps=20000,
    eval_every_steps=1000,
    log_every_steps=100,
    val_fraction=0.1,
)

_PRESETS: dict[str, TrainConfig] = {
    "digits": TrainConfig(),
    "tiny": TrainConfig(
        image_size=16,
        conv_widths=(8, 16),
        hidden_dim=32,
        embed_dim=8,
        batch_pairs=32,
        num_steps=30,
        eval_every_steps=15,
        log_every_steps=10,
        warmup_steps=5,
    ),
    "omniglot": _OMNIGLOT,
    # Same recipe for 32x32 RGB photos: deeper stages, more images per class.
    "photos": dataclasses.replace(_OMNIGLOT, architecture="resnet", image_size=32, channels=3, resnet_blocks=2,
                                  pk_classes=16, pk_images=8,
                                  num_steps=5000, eval_every_steps=500, val_fraction=0.2),
}

ARCHITECTURES = ("conv", "resnet")
LOSSES = ("contrastive", "triplet")
MINING_CHOICES = ("batch_all", "batch_hard", "semi_hard")


MAX_SEED = 2**31 - 1


def validate_config(config: TrainConfig) -> TrainConfig:
    """Return ``config`` or raise ValueError naming the bad field and its value."""
    for name, value, choices in (("architecture", config.architecture, ARCHITECTURES),
                                 ("loss", config.loss, LOSSES), ("mining", config.mining, MINING_CHOICES)):
        if value not in choices:
            raise ValueError(f"config {name}={value!r}: choose one of {list(choices)}")
    for name in ("image_size", "channels", "embed_dim", "hidden_dim", "num_steps", "batch_pairs", "pk_classes",
                 "resnet_blocks", "eval_every_steps", "log_every_steps", "prefetch_batches"):
        if getattr(config, name) < 1:
            raise ValueError(f"config {name}={getattr(config, name)}: must be at least 1")
    for name in ("seed", "warmup_steps", "checkpoint_every_steps", "max_train_minutes", "weight_decay"):
        if not getattr(config, name) >= 0:
            raise ValueError(f"config {name}={getattr(config, name)}: must not be negative")
        if not math.isfinite(getattr(config, name)):
            raise ValueError(f"config {name}={getattr(config, name)}: must be a finite number")
    if config.seed > MAX_SEED:  # JAX's and numpy's generators take 32-bit seeds
        raise ValueError(f"config seed={config.seed}: must be at most {MAX_SEED}")
    for name in ("learning_rate", "margin"):
        if not (getattr(config, name) > 0 and math.isfinite(getattr(config, name))):
            raise ValueError(f"config {name}={getattr(config, name)}: must be a positive number")
    if not 0 <= config.val_fraction < 1:
        raise ValueError(f"config val_fraction={config.val_fraction}: must be in [0, 1)")
    for name in ("conv_widths", "resnet_widths"):
        if any(w < 1 for w in getattr(config, name)):
            raise ValueError(f"config {name}={','.join(map(str, getattr(config, name)))}: every width must be at least 1")
    smallest = 2 ** len(config.conv_widths)
    if config.architecture == "conv" and config.image_size < smallest:
        raise ValueError(f"config image_size={config.image_size}: the conv encoder halves it {len(config.conv_widths)} "
                         f"times (conv_widths={','.join(map(str, config.conv_widths))}), so it must be at least {smallest}")
    if config.channels not in (1, 3):
        raise ValueError(f"config channels={config.channels}: must be 1 (grayscale) or 3 (RGB)")
    if config.image_size < 4:  # preprocess.PreprocessSpec's floor (the ResNet stem)
        raise ValueError(f"config image_size={config.image_size}: must be at least 4")
    if config.loss == "triplet" and config.pk_images < 2:
        raise ValueError(f"config pk_images={config.pk_images}: triplets need at least 2 images per class")
    if config.loss == "triplet" and config.pk_classes < 2:  # one class: no negative, a loss of 0 that learns nothing
        raise ValueError(f"config pk_classes={config.pk_classes}: triplets need at least 2 classes per batch "
                         "(a negative comes from another class)")
    for name in ("video_window_s", "video_frame_interval_s"):
        if not getattr(config, name) > 0:
            raise ValueError(f"config {name}={getattr(config, name)}: must be positive")
    if not config.resnet_widths or not config.conv_widths:
        raise ValueError("config conv_widths and resnet_widths must not be empty")
    try:
        augment_spec(config)
    except ValueError as e:
        raise ValueError(f"config: {e}") from None
    return config


def augment_spec(config: TrainConfig) -> "AugmentSpec":
    """The training-time augmentation ``config`` asks for."""
    from lookalike.model.augment import AugmentSpec

    return AugmentSpec(crop_area=config.augment_crop_area, shift=config.augment_shift, scale=config.augment_scale,
                       rotate_deg=config.augment_rotate_deg, shear_deg=config.augment_shear_deg,
                       flip=config.augment_flip, jitter=config.augment_jitter)


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def get_config(preset: str = "digits") -> TrainConfig:
    """The preset's config; raises ValueError naming the known presets."""
    try:
        return _PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown config preset {preset!r}; choose one of {preset_names()}") from None


def _parse_value(name: str, current: Any, text: str) -> Any:
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError("expected true or false (or yes/no, 1/0)")
    if isinstance(current, tuple):
        parts = [v.strip() for v in text.split(",")]
        if parts and not parts[-1] and len(parts) > 1:
            parts.pop()  # one trailing comma: "16," is the tuple (16,)
        if not all(parts):
            raise ValueError("expected integers separated by single commas, e.g. 16,32")
        return tuple(int(v) for v in parts)
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            number = _float_or_none(text)  # 1e3, 2_000.0: whole numbers written otherwise
            if number is None or not number.is_integer():
                raise ValueError(f"expected a whole number such as {current}, got {text!r}") from None
            return int(number)
    if isinstance(current, float):
        number = _float_or_none(text)
        if number is None:
            raise ValueError(f"expected a number such as {current:g}, got {text!r}")
        return number
    return text


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``key=value`` strings (``conv_widths=16,32`` for tuples)."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    changes: dict[str, Any] = {}
    for item in overrides:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or name not in fields or name == "extra":
            raise ValueError(
                f"bad override {item!r}: expected key=value with key one of "
                f"{sorted(k for k in fields if k != 'extra')}"
            )
        try:
            changes[name] = _parse_value(name, getattr(config, name), text.strip())
        except ValueError as e:
            raise ValueError(f"bad override {item!r}: {e}") from None
    return validate_config(dataclasses.replace(config, **changes))


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    d = dataclasses.asdict(config)
    for name in _TUPLE_FIELDS:
        d[name] = list(getattr(config, name))
    return d


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    kwargs = {k: v for k, v in d.items() if k in known}
    for name in _TUPLE_FIELDS:
        if name in kwargs:
            kwargs[name] = tuple(kwargs[name])
    return TrainConfig(**kwargs)


_TUPLE_FIELDS = ("conv_widths", "resnet_widths")
