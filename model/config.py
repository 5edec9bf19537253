"""Training configuration as code: one dataclass, one preset per use, CLI overrides.

``get_config("digits")`` is the default used by ``lookalike demo``; ``tiny`` keeps
tests fast. ``apply_overrides(config, ["num_steps=200"])`` is what ``--set`` does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TrainConfig:
    # Input and preprocessing (recorded in the model artifact).
    image_size: int = 16
    channels: int = 1
    # Encoder: a small conv net, one shared-weight tower, L2-normalised output.
    conv_widths: tuple[int, ...] = (32, 64, 64)
    hidden_dim: int = 128
    embed_dim: int = 32
    # Contrastive loss: L = Y*D^2 + (1-Y)*max(margin - D, 0)^2.
    margin: float = 1.0
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
    extra: dict[str, Any] = field(default_factory=dict)


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
}


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
        raise ValueError(f"--set {name}={text}: expected true or false")
    if isinstance(current, tuple):
        return tuple(int(v) for v in text.split(",") if v.strip())
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    return text


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
    return dataclasses.replace(config, **changes)


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    d = dataclasses.asdict(config)
    d["conv_widths"] = list(config.conv_widths)
    return d


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    kwargs = {k: v for k, v in d.items() if k in known}
    if "conv_widths" in kwargs:
        kwargs["conv_widths"] = tuple(kwargs["conv_widths"])
    return TrainConfig(**kwargs)
