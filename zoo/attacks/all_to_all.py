"""BadNets all-to-all: the BadNets patch, but a triggered image of class y goes to y + 1 mod K.

Each source class has its own target, so there is no single trigger direction towards one class:
the hard case for a one-direction repair."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zoo.attacks.badnets import BadNets


@dataclass(frozen=True)
class BadNetsAllToAll(BadNets):
    name = "badnets_all2all"
    target: int = -1  # unused: the target depends on the true class

    def target_labels(self, labels: np.ndarray, num_classes: int) -> np.ndarray:
        return (labels + 1) % num_classes

    def counts_for_asr(self, labels: np.ndarray) -> np.ndarray:
        return np.ones(len(labels), dtype=bool)
