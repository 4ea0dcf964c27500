"""What the server saw: bounded statistics of the features at the repair layer, per predicted class,
with no source weighing more than another.

FIRE without the trigger estimates the backdoor direction from unlabeled live traffic
(``calibration.traffic``). The protected model's tail records, for every request that reaches it, each
sample's features, its predicted class and its source (the client address the gateway names in the
``fire-source`` header; "" without one) into ``TrafficStats``:

- per class: the number of samples seen, in all and per source;
- per class: a reservoir of at most ``capacity`` feature vectors (float16), **fair between sources**:
  while a source holds fewer slots than the source holding most, each new sample of it takes a slot of
  that one; a source holding most keeps a uniform sample of its own samples (reservoir sampling). So a
  class's reservoir converges to equal shares for every source that sent enough (max-min fairness): a
  client flooding a class with clean requests, to dilute triggered ones, holds no more of it than any
  other client; with one source, the reservoir is a uniform sample of everything.

Samples whose features float16 cannot hold (non-finite, or beyond +-65504) are not recorded but
counted (``unrecordable``): they could neither be analysed nor hide anything. Memory is bounded whatever
the traffic: classes x (capacity x D x 2 + sources x 8) bytes, the capacity chosen from a byte budget.
``save`` writes the statistics atomically (safetensors); the tail loads them at start, so they survive a
restart; the CLI reads them with ``load``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from fire_backend.errors import FireError
from fire_backend.files import atomic_write

DEFAULT_BUDGET = 64 << 20  # bytes of reservoir for all classes together
MAX_CAPACITY = 512  # samples per class at most
MAX_SOURCES = 1024  # sources told apart; later ones share the last entry
FORMAT_VERSION = "2"
FLOAT16_MAX = 65504.0
OTHER_SOURCES = "(other sources)"


class TrafficStatsError(FireError):
    """A traffic statistics file is missing, corrupt, or of another format or model."""


class TrafficStats:
    def __init__(self, num_classes: int, feature_size: int, budget: int = DEFAULT_BUDGET, seed: int = 0):
        self.num_classes, self.feature_size = num_classes, feature_size
        self.capacity = int(max(8, min(MAX_CAPACITY, budget // max(1, num_classes * feature_size * 2))))
        self.counts = np.zeros(num_classes, np.int64)
        self.reservoir = np.zeros((num_classes, self.capacity, feature_size), np.float16)
        self.sources: list[str] = []
        self.unrecordable = 0
        self._seen: list[dict[int, int]] = [{} for _ in range(num_classes)]  # per class: source -> samples seen
        self._slots: list[dict[int, list[int]]] = [{} for _ in range(num_classes)]  # per class: source -> its slots
        self._filled = [0] * num_classes  # slots in use (always the first ones)
        self._random = random.Random(seed).random

    def source_index(self, name: str) -> int:
        try:
            return self.sources.index(name)
        except ValueError:
            pass
        if len(self.sources) < MAX_SOURCES - 1:
            self.sources.append(name)
            return len(self.sources) - 1
        if len(self.sources) == MAX_SOURCES - 1:
            self.sources.append(OTHER_SOURCES)
        return MAX_SOURCES - 1

    def source_names(self) -> list[str]:
        """Sources with a sample in any reservoir."""
        held = {s for owned in self._slots for s, slots in owned.items() if slots}
        return [self.sources[i] for i in sorted(held)]

    def update(self, features: np.ndarray, predicted: np.ndarray, sources: list[str] | None = None) -> None:
        """Record a batch: features (N, ...), predicted classes (N,), each sample's source (default "")."""
        flat = features.reshape(len(features), -1)
        ok = np.isfinite(flat).all(1) & (np.abs(flat).max(1, initial=0) <= FLOAT16_MAX)
        self.unrecordable += int((~ok).sum())
        index = {name: self.source_index(name) for name in set(sources or [""])}
        src = np.array([index[s] for s in sources] if sources else [index[""]] * len(flat), np.int64)
        placed: dict[tuple[int, int], int] = {}  # (class, slot) -> row; a later row of the batch wins
        for i in np.flatnonzero(ok):
            slot = self._admit(int(predicted[i]), int(src[i]))
            if slot is not None:
                placed[int(predicted[i]), slot] = int(i)
        if placed:
            (cs, slots), rows = zip(*placed.keys(), strict=True), list(placed.values())
            self.reservoir[list(cs), list(slots)] = flat[rows]  # one write of the kept rows (float16)

    def _admit(self, c: int, s: int) -> int | None:
        """The slot a sample of class ``c`` from source ``s`` takes, or None (bookkeeping only: plain
        Python containers, this runs for every sample the tail serves)."""
        self.counts[c] += 1
        seen = self._seen[c]
        seen[s] = seen.get(s, 0) + 1
        owned = self._slots[c]
        mine = owned.setdefault(s, [])
        if self._filled[c] < self.capacity:
            slot = self._filled[c]
            self._filled[c] += 1
        else:
            largest = max(owned, key=lambda k: len(owned[k]))
            if len(mine) < len(owned[largest]):  # under-represented: take a slot of the largest holder
                victim = owned[largest]
            elif self._random() * seen[s] < len(mine):  # keep a uniform sample of its own samples
                victim = mine
            else:
                return None
            slot = victim.pop(int(self._random() * len(victim)))
        mine.append(slot)
        return slot

    def samples(self, c: int) -> np.ndarray:
        """The reservoir of class ``c`` (float32, at most ``capacity`` rows)."""
        return self.reservoir[c, : self._filled[c]].astype(np.float32)

    def held(self, c: int) -> dict[str, int]:
        """Reservoir slots of class ``c`` per source."""
        return {self.sources[s]: len(slots) for s, slots in self._slots[c].items() if slots}

    def largest_source_share(self, c: int) -> float:
        held = self.held(c).values()
        return max(held) / sum(held) if held else 0.0

    def class_sources(self, c: int) -> int:
        return len(self.held(c))

    @property
    def slot_source(self) -> np.ndarray:
        """(classes, capacity): the source index of each reservoir slot, -1 where empty."""
        out = np.full((self.num_classes, self.capacity), -1, np.int32)
        for c, owned in enumerate(self._slots):
            for s, slots in owned.items():
                out[c, slots] = s
        return out

    @property
    def seen(self) -> np.ndarray:
        """(classes, sources): samples seen per class and source."""
        out = np.zeros((self.num_classes, max(1, len(self.sources))), np.int64)
        for c, seen in enumerate(self._seen):
            for s, n in seen.items():
                out[c, s] = n
        return out

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def save(self, path: str | Path, meta: dict | None = None) -> Path:
        tensors = {"counts": self.counts, "reservoir": self.reservoir, "slot_source": self.slot_source,
                   "seen": self.seen, "unrecordable": np.array([self.unrecordable], np.int64)}  # fmt: skip
        header = {"format": FORMAT_VERSION, "capacity": str(self.capacity), "sources": json.dumps(self.sources),
                  "extra": json.dumps(meta or {})}  # fmt: skip
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))

    @classmethod
    def load(cls, path: str | Path) -> tuple[TrafficStats, dict]:
        try:
            with safe_open(str(path), framework="numpy") as f:
                header = f.metadata() or {}
                if header.get("format") != FORMAT_VERSION:
                    raise TrafficStatsError(f"{path}: traffic statistics of format {header.get('format', '1')}, "
                                            f"this version reads {FORMAT_VERSION}")  # fmt: skip
                t = {k: f.get_tensor(k) for k in ("counts", "reservoir", "slot_source", "seen", "unrecordable")}
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise TrafficStatsError(f"{path}: not readable traffic statistics ({e})") from None
        stats = cls.__new__(cls)
        stats.num_classes, stats.capacity, stats.feature_size = t["reservoir"].shape
        stats.counts, stats.reservoir = t["counts"], t["reservoir"]
        stats.sources = json.loads(header.get("sources", "[]"))
        stats.unrecordable = int(t["unrecordable"][0])
        stats._seen = [{int(s): int(n) for s, n in enumerate(row) if n} for row in t["seen"]]
        stats._slots = [{} for _ in range(stats.num_classes)]
        for c, row in enumerate(t["slot_source"]):
            for slot, s in enumerate(row.tolist()):
                if s >= 0:
                    stats._slots[c].setdefault(s, []).append(slot)
        stats._filled = [int((row >= 0).sum()) for row in t["slot_source"]]
        stats._random = random.Random(0).random
        return stats, json.loads(header.get("extra", "{}"))

    def fits(self, num_classes: int, feature_size: int) -> bool:
        return (self.num_classes, self.feature_size) == (num_classes, feature_size)
