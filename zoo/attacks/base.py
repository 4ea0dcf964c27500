"""One interface for every backdoor attack.

An attack owns a trigger and a labelling rule:

- ``apply(images)`` puts the trigger on images. Patch and blend attacks describe their trigger as data
  (``Trigger``: a pattern image and a per-pixel blend mask); others (WaNet's warp, SIG's additive
  signal) override ``apply``.
- ``target_labels(labels, num_classes)`` is what the attacker wants triggered images classified as
  (all-to-one: the target class; all-to-all: y + 1 mod K); ``training_labels`` what poisoned training
  samples are labelled (the same, except for clean-label attacks such as SIG, which keep true labels).
- ``counts_for_asr(labels)`` says which triggered test images count for ASR and PA (all-to-one: those
  not already of the target class).
- ``poison_training_set`` poisons a ``poison_rate`` share of a training split.

Images are uint8 NHWC arrays throughout, as the data loaders return them.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np

from fire_backend.errors import InvalidInputError


@dataclass(frozen=True)
class Trigger:
    """x' = (1 - mask) * x + mask * pattern, per pixel; pattern in [0, 255], mask in [0, 1]."""

    pattern: np.ndarray  # (H, W, 3) float32
    mask: np.ndarray  # (H, W, 1) float32

    def stamp(self, images: np.ndarray) -> np.ndarray:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:3] != self.pattern.shape[:2]:
            raise InvalidInputError(
                f"expected uint8 images (N, {self.pattern.shape[0]}, {self.pattern.shape[1]}, 3), "
                f"got {images.dtype} {images.shape}"
            )
        out = (1.0 - self.mask) * images.astype(np.float32) + self.mask * self.pattern
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _check_images(images: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise InvalidInputError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")


class Attack(ABC):
    """Base class; subclasses are frozen dataclasses registered by ``name``."""

    name: ClassVar[str]
    registry: ClassVar[dict[str, type[Attack]]] = {}
    target: int
    poison_rate: float
    fresh_poison_each_epoch: ClassVar[bool] = False  # training re-draws the poisoned samples every epoch

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Attack.registry[cls.name] = cls

    def trigger(self, size: tuple[int, int] = (32, 32)) -> Trigger:
        """The trigger as a pattern + blend mask for images of ``size`` (height, width): patch and blend
        attacks; any size, square or not."""
        raise NotImplementedError(f"{self.name} has no stamp trigger; it overrides apply()")

    def apply(self, images: np.ndarray) -> np.ndarray:
        """Put the trigger on every image (labels untouched). Deterministic: same images, same output."""
        return self.trigger(tuple(images.shape[1:3])).stamp(images)

    def target_labels(self, labels: np.ndarray, num_classes: int) -> np.ndarray:
        """The labels the attacker wants triggered images of true class ``labels`` to get (all-to-one)."""
        return np.full_like(labels, self.target)

    def training_labels(self, labels: np.ndarray, num_classes: int) -> np.ndarray:
        """The labels poisoned training samples get (dirty-label: the attacker's targets)."""
        return self.target_labels(labels, num_classes)

    def counts_for_asr(self, labels: np.ndarray) -> np.ndarray:
        """Which triggered images count for ASR / PA: all-to-one leaves out the target class itself."""
        return labels != self.target

    def _choose_poisoned(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Indices of the training samples to poison (dirty-label: any ``poison_rate`` share)."""
        n_poison = int(round(self.poison_rate * len(labels)))
        return rng.choice(len(labels), size=n_poison, replace=False)

    def poison_training_set(
        self, images: np.ndarray, labels: np.ndarray, num_classes: int, seed: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Poison a ``poison_rate`` fraction of a training set; returns images, labels, poisoned mask."""
        _check_images(images)
        rng = np.random.default_rng(seed)
        idx = np.sort(self._choose_poisoned(labels, rng))
        images, labels = images.copy(), labels.copy()
        images[idx] = self.apply(images[idx])
        labels[idx] = self.training_labels(labels[idx], num_classes)
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
        raise InvalidInputError(f"unknown attack {name!r}; known: {sorted(Attack.registry)}")
    return Attack.registry[name](**spec)


def make_attack(name: str, **overrides: Any) -> Attack:
    return attack_from_spec({"name": name, **overrides})
