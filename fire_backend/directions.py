"""The direction file: what calibration learns and the repair model loads.

A safetensors file with tensors ``beta`` (the trigger direction, feature shape), ``mu`` (clean feature
mean, feature shape), ``threshold`` (scalar, for ``gated``) and, for a rank-k ``project`` repair, an
optional ``basis`` (k, *feature shape: orthonormal rows, the first being beta / |beta|); for ``project``,
an optional ``readout`` (rank, *feature shape: the rows its scores are read along, with readout x
directions^T = I; without one, the directions themselves), plus string
metadata: format version,
layer, feature shape, dtype, mode, alpha, sample counts, estimator, the sha256 of the head ONNX the
directions belong to, creation time, a sha256 over the tensors and one over the rest of the metadata.

``DirectionFile.load`` validates everything and raises ``DirectionFileError`` naming the file and the
reason; the repair model refuses to load on any of them (fail closed).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from fire_backend.errors import FireError
from fire_backend.files import atomic_write

FORMAT_VERSION = 2  # what this FIRE reads up to; a file is written as the oldest version that holds it
READOUT_VERSION = 2  # the first version with a readout (a FIRE reading version 1 only refuses such a file)
MODES = ("subtract", "project", "gated")
ESTIMATORS = ("paired", "unpaired", "streaming", "traffic", "observe")
TENSORS = ("beta", "mu", "threshold")  # always present
OPTIONAL_TENSORS = ("basis", "readout")


class DirectionFileError(FireError, ValueError):
    """A direction file is missing, corrupt, or does not fit the deployment."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"direction file {path}: {reason}")
        self.path, self.reason = str(path), reason


def metadata_sha256(metadata: dict[str, str]) -> str:
    """sha256 over every metadata field but this checksum itself (canonical JSON)."""
    fields = {k: v for k, v in metadata.items() if k != "metadata_sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _array(x) -> np.ndarray:
    """A NumPy array of ``x`` (NumPy, or a CPU torch tensor: through the array protocol, no torch import)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    return np.asarray(x)


def tensors_sha256(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in TENSORS + tuple(n for n in OPTIONAL_TENSORS if n in tensors):
        t = np.ascontiguousarray(_array(tensors[name]), dtype=np.float32)
        h.update(f"{name}:{list(t.shape)}:".encode())
        h.update(t.tobytes())
    return h.hexdigest()


@dataclass
class DirectionFile:
    beta: np.ndarray  # float32; torch tensors given here are taken as NumPy arrays
    mu: np.ndarray
    threshold: float
    layer: str
    mode: str
    alpha: float
    head_sha256: str
    estimator: str
    n_poisoned: int
    n_clean: int
    fpr: float = 0.01
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    extra: dict = field(default_factory=dict)  # free-form provenance (attack spec, seed, ...)
    basis: np.ndarray | None = None  # (k, *feature_shape) for a rank-k project repair; None = rank 1
    # project: repair only the samples past mu along the first direction (False: every sample, for a basis
    # whose views' shifts do not all point that way; calibration.augment.spatial_estimate decides)
    project_gate: bool = True
    # project: the rows (rank, *feature_shape) its scores are read along (calibration.estimators.oblique_readout);
    # None: the directions themselves (the basis, or beta / |beta|)
    readout: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.beta, self.mu = _array(self.beta), _array(self.mu)
        if self.basis is not None:
            self.basis = _array(self.basis)
        if self.readout is not None:
            self.readout = _array(self.readout)

    def with_mode(self, mode: str, alpha: float | None = None) -> DirectionFile:
        """A copy repairing in ``mode`` (at ``alpha`` when given); a mode other than ``project`` drops the
        basis and the readout, which only ``project`` uses."""
        keep = mode == "project"
        return replace(self, mode=mode, alpha=self.alpha if alpha is None else alpha,
                       basis=self.basis if keep else None, readout=self.readout if keep else None)  # fmt: skip

    def unit_directions(self) -> np.ndarray:
        """The repair's directions, flattened (rank, D) float64: the basis, or beta / |beta|."""
        if self.basis is not None:
            return self.basis.reshape(len(self.basis), -1).astype(np.float64)
        beta = self.beta.reshape(1, -1).astype(np.float64)
        return beta / np.linalg.norm(beta)

    def readout_error(self) -> float:
        """How far readout x directions^T is from the identity (largest entry off); 0 without a readout."""
        if self.readout is None:
            return 0.0
        r = self.readout.reshape(len(self.readout), -1).astype(np.float64)
        return float(np.abs(r @ self.unit_directions().T - np.eye(len(r))).max())

    def gate_row(self) -> np.ndarray:
        """The row the project repair's gate reads (flattened, float64): the readout's first, else the
        first direction. A sample moves when its score along it is past mu's."""
        if self.readout is not None:
            return self.readout.reshape(len(self.readout), -1)[0].astype(np.float64)
        return self.unit_directions()[0]

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.beta.shape)

    @property
    def version(self) -> int:
        """1 for a calibrated file; each streaming update (``fire update``) writes version + 1."""
        return int(self.extra.get("stream", {}).get("version", 1))

    @property
    def updates(self) -> int:
        return int(self.extra.get("stream", {}).get("updates", 0))

    @property
    def checksum32(self) -> int:
        """The first 32 bits of the file's metadata checksum (which covers the tensors' sha256 and every
        setting): what the server's ``fire_direction_checksum`` gauge shows."""
        return int(self.metadata()["metadata_sha256"][:8], 16)

    @property
    def rank(self) -> int:
        return 1 if self.basis is None else len(self.basis)

    def tensors(self) -> dict[str, np.ndarray]:
        t = {
            "beta": np.ascontiguousarray(self.beta, dtype=np.float32),
            "mu": np.ascontiguousarray(self.mu, dtype=np.float32),
            "threshold": np.array([self.threshold], dtype=np.float32),
        }
        if self.basis is not None:
            t["basis"] = np.ascontiguousarray(self.basis, dtype=np.float32)
        if self.readout is not None:
            t["readout"] = np.ascontiguousarray(self.readout, dtype=np.float32)
        return t

    def metadata(self) -> dict[str, str]:
        t = self.tensors()
        meta = {
            "format_version": str(READOUT_VERSION if self.readout is not None else 1),
            "layer": self.layer,
            "feature_shape": json.dumps(list(self.feature_shape)),
            "dtype": "float32",
            "mode": self.mode,
            "alpha": repr(float(self.alpha)),
            "head_sha256": self.head_sha256,
            "estimator": self.estimator,
            "n_poisoned": str(self.n_poisoned),
            "n_clean": str(self.n_clean),
            "fpr": repr(float(self.fpr)),
            "project_gate": "1" if self.project_gate else "0",
            "created": self.created,
            "tensors_sha256": tensors_sha256(t),
            "extra": json.dumps(self.extra),
        }
        return {**meta, "metadata_sha256": metadata_sha256(meta)}

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename): a reader never sees a half-written file."""
        self.validate(path)
        path = Path(path)
        atomic_write(path, lambda tmp: save_file(self.tensors(), tmp, metadata=self.metadata()))
        return path

    def validate(self, path: str | Path = "<memory>") -> None:
        def fail(reason: str) -> None:
            raise DirectionFileError(path, reason)

        if self.mode not in MODES:
            fail(f"unknown mode {self.mode!r} (expected one of {MODES})")
        if self.estimator not in ESTIMATORS:
            fail(f"unknown estimator {self.estimator!r} (expected one of {ESTIMATORS})")
        if self.beta.shape != self.mu.shape:
            fail(f"beta shape {tuple(self.beta.shape)} != mu shape {tuple(self.mu.shape)}")
        for name, t in (("beta", self.beta), ("mu", self.mu)):
            if t.dtype != np.float32:
                fail(f"{name} has dtype {t.dtype}, expected float32")
            if not bool(np.isfinite(t).all()):
                fail(f"{name} contains NaN or Inf values")
        if not float(np.linalg.norm(self.beta)) > 0:
            fail("beta is all zeros: no direction to repair along")
        if self.basis is not None:
            b = self.basis
            if b.dtype != np.float32 or b.ndim != self.beta.ndim + 1 or tuple(b.shape[1:]) != self.feature_shape:
                shape = ", ".join(map(str, self.feature_shape))
                fail(f"basis must be float32 (k, {shape}), got {b.dtype} {tuple(b.shape)}")
            if len(b) == 0:
                fail("basis has no rows (leave it out for a rank-1 repair)")
            if self.mode != "project":
                fail(f"a basis (rank {len(b)}) is only used by mode 'project', not {self.mode!r}")
            flat = b.reshape(len(b), -1).astype(np.float64)
            if not bool(np.isfinite(flat).all()):
                fail("basis contains NaN or Inf values")
            if float(np.abs(flat @ flat.T - np.eye(len(b))).max()) > 1e-3:
                fail("basis rows are not orthonormal")
            beta = self.beta.reshape(-1).astype(np.float64)
            if float(flat[0] @ (beta / np.linalg.norm(beta))) < 0.999:
                fail("the basis's first row is not beta / |beta|")
        if self.readout is not None:
            r = self.readout
            if r.dtype != np.float32 or tuple(r.shape) != (self.rank, *self.feature_shape):
                shape = ", ".join(map(str, self.feature_shape))
                fail(f"readout must be float32 ({self.rank}, {shape}) (a row per direction), got {r.dtype} "
                     f"{tuple(r.shape)}")  # fmt: skip
            if self.mode != "project":
                fail(f"a readout is only used by mode 'project', not {self.mode!r}")
            flat = r.reshape(len(r), -1).astype(np.float64)
            if not bool(np.isfinite(flat).all()):
                fail("readout contains NaN or Inf values")
            if self.readout_error() > 1e-3:
                fail(
                    "readout x directions^T is not the identity: a shift along the directions would not read back whole"
                )
        if not isinstance(self.project_gate, bool):
            fail(f"project_gate must be true or false, got {self.project_gate!r}")
        for name, v in (("alpha", self.alpha), ("threshold", self.threshold), ("fpr", self.fpr)):
            if not math.isfinite(v):
                fail(f"{name} is not finite ({v})")

    @classmethod
    def load(
        cls, path: str | Path, *, feature_shape: tuple[int, ...] | None = None, head_sha256: str | None = None
    ) -> DirectionFile:
        """Read and validate; optionally check it fits a deployment (feature shape, head fingerprint)."""
        path = Path(path)
        meta, tensors = _read_checked(path)
        try:
            recorded_shape = tuple(json.loads(meta["feature_shape"]))
            d = cls(
                beta=tensors["beta"],
                mu=tensors["mu"],
                threshold=float(tensors["threshold"].reshape(-1)[0]),
                layer=meta["layer"],
                mode=meta["mode"],
                alpha=float(meta["alpha"]),
                head_sha256=meta["head_sha256"],
                estimator=meta["estimator"],
                n_poisoned=int(meta["n_poisoned"]),
                n_clean=int(meta["n_clean"]),
                fpr=float(meta["fpr"]),
                created=meta["created"],
                extra=json.loads(meta.get("extra", "{}")),
                basis=tensors.get("basis"),
                readout=tensors.get("readout"),
                project_gate=_flag(meta.get("project_gate", "1"), "project_gate"),
            )
        except (ValueError, TypeError, json.JSONDecodeError, IndexError) as e:
            raise DirectionFileError(path, f"malformed metadata: {e}") from None
        if recorded_shape != d.feature_shape:
            raise DirectionFileError(path, f"metadata feature_shape {recorded_shape} != tensor shape {d.feature_shape}")
        d.validate(path)
        d.check_fits(path, feature_shape, head_sha256)
        return d

    def check_fits(self, path, feature_shape: tuple[int, ...] | None, head_sha256: str | None) -> None:
        """Raise unless the file fits the deployment: the layer's feature shape and the producer's sha256."""
        if feature_shape is not None and tuple(feature_shape) != self.feature_shape:
            raise DirectionFileError(
                path, f"feature shape {self.feature_shape} does not match the deployed layer's {tuple(feature_shape)}"
            )
        if head_sha256 is not None and head_sha256 != self.head_sha256:
            raise DirectionFileError(
                path,
                f"calibrated for head {self.head_sha256[:12]}..., but the deployed head is {head_sha256[:12]}...; "
                "re-run `fire calibrate` against the deployed model",
            )


REQUIRED_METADATA = (
    "layer",
    "feature_shape",
    "mode",
    "alpha",
    "head_sha256",
    "estimator",
    "n_poisoned",
    "n_clean",
    "fpr",
    "created",
    "tensors_sha256",
    "metadata_sha256",
)


def _flag(value: str, name: str) -> bool:
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be '1' or '0', got {value!r}")
    return value == "1"


def _read_checked(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """Metadata and tensors of a readable file in this format, both matching their checksums."""

    def fail(reason: str) -> DirectionFileError:
        return DirectionFileError(path, reason)

    if not path.is_file():
        raise fail("not found")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise fail(f"not a readable safetensors file (truncated or corrupted?): {e}") from None
    version = meta.get("format_version")
    if version not in [str(v) for v in range(1, FORMAT_VERSION + 1)]:
        raise fail(f"unknown format version {version!r} (this FIRE reads versions 1 to {FORMAT_VERSION})")
    missing = [k for k in TENSORS if k not in tensors]
    if missing:
        raise fail(f"missing tensors {missing}")
    unknown = sorted(set(tensors) - set(TENSORS + OPTIONAL_TENSORS))
    if unknown:
        raise fail(f"unknown tensors {unknown} (written by a newer FIRE?)")
    if "readout" in tensors and int(version) < READOUT_VERSION:
        raise fail(f"a readout in a version {version} file (readouts came with version {READOUT_VERSION})")
    absent = [k for k in REQUIRED_METADATA if k not in meta]
    if absent:
        raise fail(f"missing metadata {absent}")
    if meta["metadata_sha256"] != metadata_sha256(meta):
        raise fail("metadata checksum mismatch: the metadata was modified after the file was written")
    if meta["tensors_sha256"] != tensors_sha256(tensors):
        raise fail("tensor checksum mismatch: the tensors were modified after the file was written")
    return meta, tensors
