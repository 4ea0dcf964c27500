"""Streaming direction updates: ``fire update`` and ``fire rollback`` against a running server.

Operators (or an upstream detector) report images they know or suspect to be triggered, and optionally
clean ones. Their features come from the *deployed* head (the server's ``<name>_head`` model), so the
estimate lives in exactly the space the repair edits. The estimate is unpaired and running:

    beta = mean f(reported triggered) - mean f(clean),   mu = mean f(clean)

with numerically stable running means (nothing but the means and counts is kept). The calibrated file
seeds the stream: its ``mu + beta`` counts as ``n_poisoned`` triggered observations and its ``mu`` as
``n_clean`` clean ones, so a few reports refine the direction instead of replacing it.

Guard rails, all recorded in ``updates.jsonl`` and the file's metadata:
- nothing takes effect before ``min_samples`` triggered reports have arrived (pending state);
- one update moves beta by at most ``max_step`` x |beta| (larger moves are clipped, not refused);
- every new file is validated against the deployment and swapped in by ``reload_directions`` (the
  repair model picks the replaced file up itself; zero failed requests); a refused file leaves the
  old one in place;
- every version's direction file and running state is kept; ``rollback`` reinstates an earlier one.

State lives next to the repository, not inside it (Triton would try to load anything inside):
``<repository>.stream/<repair model>/`` holds ``state.safetensors``, ``history/`` and ``updates.jsonl``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from calibration.estimators import RunningMean, unpaired_direction
from calibration.factory import make_directions
from clients import FireClient, load_images
from fire_backend.directions import DirectionFile
from fire_backend.errors import InvalidInputError
from fire_backend.files import atomic_write
from fire_backend.names import DIRECTIONS_FILE, FEATURES, MODEL_VERSION, PARAM_PREPROCESS
from modelio.preprocess import Preprocess
from serving.configs import read_config
from serving.control import reload_directions
from serving.repository import producer_of


@dataclass
class GuardRails:
    min_samples: int = 10  # triggered reports needed before the first update takes effect
    max_step: float = 0.5  # one update moves beta by at most this fraction of |beta|
    min_clean_for_threshold: int = 50  # gated: re-derive the threshold only from this many clean reports


@dataclass
class UpdateResult:
    status: str  # "updated" | "pending"
    version: int
    reported_poisoned: int  # triggered reports since the stream started
    reported_clean: int
    step: float = 0.0  # |delta beta| / |beta| actually applied
    proposed_step: float = 0.0  # before clipping
    clipped: bool = False
    cosine: float = 1.0  # between the old and the new beta


def state_dir(repository: str | Path, repair_model: str) -> Path:
    repository = Path(repository).resolve()
    return repository.parent / f"{repository.name}.stream" / repair_model


def _running(mean, count: int) -> RunningMean:
    r = RunningMean()
    if count:
        r.mean, r.count = np.array(mean, dtype=np.float64).reshape(-1), int(count)
    return r


class StreamState:
    """The running means behind the current direction file (safetensors; no pickles)."""

    def __init__(self, poisoned: RunningMean, clean: RunningMean, reported_poisoned: int, reported_clean: int):
        self.poisoned, self.clean = poisoned, clean
        self.reported_poisoned, self.reported_clean = reported_poisoned, reported_clean

    @classmethod
    def seed(cls, d: DirectionFile) -> StreamState:
        mu = d.mu.reshape(-1)
        return cls(_running(mu + d.beta.reshape(-1), d.n_poisoned), _running(mu, d.n_clean), 0, 0)

    @classmethod
    def load(cls, path: Path) -> StreamState:
        t = load_file(str(path))
        counts = t["counts"].tolist()
        return cls(_running(t["poisoned_mean"], counts[0]), _running(t["clean_mean"], counts[1]), counts[2], counts[3])

    def save(self, path: Path) -> None:
        counts = [self.poisoned.count, self.clean.count, self.reported_poisoned, self.reported_clean]
        tensors = {
            "poisoned_mean": torch.from_numpy(np.asarray(self.poisoned.mean, dtype=np.float64)),
            "clean_mean": torch.from_numpy(np.asarray(self.clean.mean, dtype=np.float64)),
            "counts": torch.tensor(counts, dtype=torch.int64),
        }
        atomic_write(path, lambda tmp: save_file(tensors, tmp))


class DirectionStream:
    """One protected model's stream: ``update`` with reported features, ``rollback`` to a version."""

    def __init__(self, metrics_url: str | None, repository: str | Path, repair_model: str):
        self.metrics_url = metrics_url  # where to see the server pick up a new file (None: do not wait)
        self.repository, self.repair_model = Path(repository), repair_model
        self.dir = state_dir(repository, repair_model)
        self.live = self.repository / repair_model / MODEL_VERSION / DIRECTIONS_FILE

    def current(self) -> DirectionFile:
        return DirectionFile.load(self.live)

    def _state(self, current: DirectionFile) -> StreamState:
        path = self.dir / "state.safetensors"
        if path.is_file():
            return StreamState.load(path)
        # first update: keep version 1 (the calibrated file) and its state for rollback
        state = StreamState.seed(current)
        (self.dir / "history").mkdir(parents=True, exist_ok=True)
        current.save(self.dir / "history" / f"v{current.version}.safetensors")
        state.save(self.dir / "history" / f"state_v{current.version}.safetensors")
        return state

    def _log(self, entry: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / "updates.jsonl").open("a") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **entry}) + "\n")

    def history(self) -> list[dict]:
        log = self.dir / "updates.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []

    def update(
        self, poisoned_features: np.ndarray, clean_features: np.ndarray | None = None, rails: GuardRails | None = None
    ) -> UpdateResult:
        rails = rails or GuardRails()
        current = self.current()
        state = self._state(current)
        shape = current.feature_shape
        for name, f in (("triggered", poisoned_features), ("clean", clean_features)):
            if f is not None and (f.shape[1:] != shape or not np.isfinite(f).all()):
                raise InvalidInputError(f"{name} features must be finite with shape (N, {shape}), got {f.shape}")
        state.poisoned.update(poisoned_features.reshape(len(poisoned_features), -1))
        state.reported_poisoned += len(poisoned_features)
        if clean_features is not None and len(clean_features):
            state.clean.update(clean_features.reshape(len(clean_features), -1))
            state.reported_clean += len(clean_features)
        if state.reported_poisoned < rails.min_samples:
            state.save(self.dir / "state.safetensors")
            result = UpdateResult("pending", current.version, state.reported_poisoned, state.reported_clean)
            self._log({"event": "pending", **asdict(result), "min_samples": rails.min_samples})
            return result

        old = torch.from_numpy(current.beta.reshape(-1)).double()
        delta = unpaired_direction(state.clean, state.poisoned).double() - old
        step = float(delta.norm() / old.norm())
        clipped = step > rails.max_step
        if clipped:
            delta *= rails.max_step / step
        new_beta = (old + delta).float().reshape(shape)
        cosine = float(torch.nn.functional.cosine_similarity(old, new_beta.reshape(-1).double(), dim=0))
        kept = [int(p.stem[1:]) for p in (self.dir / "history").glob("v*.safetensors")]
        version = max([current.version, *kept]) + 1  # after a rollback, never reuse a kept version number
        enough_clean = clean_features is not None and len(clean_features) >= rails.min_clean_for_threshold
        d = make_directions(
            new_beta,
            clean_features if enough_clean else np.zeros((0, *shape), np.float32),
            mu=state.clean.value().reshape(shape),
            threshold=None if enough_clean else current.threshold,  # gated: re-derived from enough clean reports
            layer=current.layer,
            mode=current.mode,
            alpha=current.alpha,
            fpr=current.fpr,
            estimator="streaming",
            head_sha256=current.head_sha256,
            n_poisoned=state.poisoned.count,
            basis=None,  # a streamed direction is rank 1: the basis of the old one no longer fits it
            extra={**current.extra, "stream": {"version": version, "updates": current.updates + 1}},
        )
        d.n_clean = state.clean.count
        staged = self.dir / "history" / f"v{version}.safetensors"
        d.save(staged)
        reload_directions(self.repository, self.repair_model, staged, self.metrics_url)
        state.save(self.dir / "history" / f"state_v{version}.safetensors")
        state.save(self.dir / "state.safetensors")
        result = UpdateResult(
            "updated", version, state.reported_poisoned, state.reported_clean,
            min(step, rails.max_step), step, clipped, cosine,
        )  # fmt: skip
        self._log({"event": "updated", **asdict(result)})
        return result

    def publish(self, d: DirectionFile, event: dict) -> int:
        """Deploy a direction file found another way (e.g. from traffic) as the next version, with the
        same validation, history and rollback as streaming updates; the running state restarts from it."""
        current = self.current()
        self._state(current)  # keeps version 1 and its state for rollback on the first change
        kept = [int(p.stem[1:]) for p in (self.dir / "history").glob("v*.safetensors")]
        version = max([current.version, *kept]) + 1
        d.extra = {**d.extra, "stream": {"version": version, "updates": current.updates + 1}}
        staged = d.save(self.dir / "history" / f"v{version}.safetensors")
        reload_directions(self.repository, self.repair_model, staged, self.metrics_url)
        state = StreamState.seed(d)
        state.save(self.dir / "history" / f"state_v{version}.safetensors")
        state.save(self.dir / "state.safetensors")
        self._log({"event": "published", "version": version, **event})
        return version

    def rollback(self, to_version: int | None = None) -> DirectionFile:
        """Reinstate an earlier version (default: the one before the live one) and its running state.
        The reinstated file keeps its own version number, so metrics show which one is serving."""
        current = self.current()
        target = current.version - 1 if to_version is None else to_version
        path = self.dir / "history" / f"v{target}.safetensors"
        if target < 1 or not path.is_file():
            kept = sorted(p.stem for p in (self.dir / "history").glob("v*.safetensors")) if self.dir.exists() else []
            raise InvalidInputError(f"no version {target} to roll back to for {self.repair_model}; kept: {kept}")
        d = reload_directions(self.repository, self.repair_model, path, self.metrics_url)
        state = self.dir / "history" / f"state_v{target}.safetensors"
        atomic_write(self.dir / "state.safetensors", lambda tmp: Path(tmp).write_bytes(state.read_bytes()))
        self._log({"event": "rollback", "from_version": current.version, "version": target})
        return d


def head_features(url: str, repository: str | Path, repair_model: str, images: np.ndarray,
                  protocol: str = "grpc") -> np.ndarray:  # fmt: skip
    """Features of uint8 NHWC images from the model whose output ``repair_model`` edits, on the server:
    fed as the protected model takes its input (its tensor name and preprocessing)."""
    if len(images) == 0:
        return np.zeros((0,), np.float32)
    repository = Path(repository)
    producer = producer_of(repository, repair_model)
    params = read_config(repository / repair_model).parameters
    pre = Preprocess.from_dict(json.loads(params[PARAM_PREPROCESS].string_value))
    input_name = read_config(repository / producer).input[0].name
    return FireClient(url, protocol).infer(producer, pre.apply(images), input_name, FEATURES)


def read_images(paths: list[str]) -> np.ndarray:
    """Images from files, directories of files, or ``.npz`` archives with a uint8 ``images`` array."""
    arrays, files = [], []
    for p in map(Path, paths):
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                arr = z["images"]
            if arr.dtype != np.uint8 or arr.ndim != 4:
                raise InvalidInputError(f"{p}: 'images' must be uint8 (N, H, W, 3), got {arr.dtype} {arr.shape}")
            arrays.append(arr)
        elif p.is_dir():
            files += sorted(str(f) for f in p.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".ppm"))
        else:
            files.append(str(p))
    if files:
        arrays.append(load_images(files))
    if not arrays:
        raise InvalidInputError(f"no images in {paths}")
    out = np.concatenate(arrays)
    if not math.prod(out.shape):
        raise InvalidInputError(f"no images in {paths}")
    return out
