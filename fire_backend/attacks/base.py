"""One interface for every backdoor attack.

An attack owns a trigger (as data: a pattern image and a per-pixel blend mask) and a labelling rule.
``apply`` stamps the trigger on images; ``poison`` also relabels them (all-to-one: the target class).
Images are uint8 NHWC arrays throughout, as the data loaders return them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np


@dataclass(frozen=True)
class Trigger:
    """x' = (1 - mask) * x + mask * pattern, per pixel; pattern in [0, 255], mask in [0, 1]."""

    pattern: np.ndarray  # (H, W, 3) float32
    mask: np.ndarray  # (H, W, 1) float32

    def stamp(self, images: np.ndarray) -> np.ndarray:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:3] != self.pattern.shape[:2]:
            raise ValueError(
                f"expected uint8 images (N, {self.pattern.shape[0]}, {self.pattern.shape[1]}, 3), "
                f"got {images.dtype} {images.shape}"
            )
        out = (1.0 - self.mask) * images.astype(np.float32) + self.mask * self.pattern
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class Attack(ABC):
    """Base class; subclasses are frozen dataclasses registered by ``name``."""

    name: ClassVar[str]
    registry: ClassVar[dict[str, type[Attack]]] = {}
    target: int
    poison_rate: float

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Attack.registry[cls.name] = cls

    @abstractmethod
    def trigger(self, image_size: int = 32) -> Trigger: ...

    def apply(self, images: np.ndarray) -> np.ndarray:
        """Stamp the trigger on every image (labels untouched)."""
        return self.trigger(images.shape[1]).stamp(images)

    def poison(self, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Triggered images and the labels the attacker wants for them (all-to-one)."""
        return self.apply(images), np.full_like(labels, self.target)

    def poison_training_set(
        self, images: np.ndarray, labels: np.ndarray, seed: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Poison a ``poison_rate`` fraction of a training set; returns images, labels, poisoned mask."""
        rng = np.random.default_rng(seed)
        n_poison = int(round(self.poison_rate * len(labels)))
        idx = rng.choice(len(labels), size=n_poison, replace=False)
        images, labels = images.copy(), labels.copy()
        images[idx], labels[idx] = self.poison(images[idx], labels[idx])
        mask = np.zeros(len(labels), dtype=bool)
        mask[idx] = True
        return images, labels, mask

    def spec(self) -> dict[str, Any]:
        """JSON-able description: ``attack_from_spec(a.spec())`` rebuilds the same attack."""
        return {"name": self.name, **asdict(self)}  # type: ignore[call-overload]


def attack_from_spec(spec: dict[str, Any]) -> Attack:
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in Attack.registry:
        raise ValueError(f"unknown attack {name!r}; known: {sorted(Attack.registry)}")
    return Attack.registry[name](**spec)


def make_attack(name: str, **overrides: Any) -> Attack:
    return attack_from_spec({"name": name, **overrides})
