"""Dataset loaders: CIFAR-10 and GTSRB from the project's offline archives.

Images are decoded once from the ``.tar.xz`` archives (read as streams; nothing is extracted) into an
``.npz`` cache of uint8 arrays, NHWC, 32x32x3. Later calls load the cache in well under a second.

Where the archives are looked up, in order:
  1. ``$FIRE_DATA_DIR`` (a directory holding ``cifar10-jpeg.tar.xz`` / ``gtsrb32-ppm.tar.xz``),
  2. ``../shared/datasets`` next to the repository (or the current directory).
The cache lives in ``$FIRE_CACHE_DIR`` (default ``~/.cache/fire``).
"""

from __future__ import annotations

import csv
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from fire_backend.cache import cache_dir, trusted_file
from fire_backend.errors import FireError, InvalidInputError
from fire_backend.names import DATA_ENV, PROJECT_ROOT

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
ARCHIVES = {"cifar10": "cifar10-jpeg.tar.xz", "gtsrb": "gtsrb32-ppm.tar.xz"}


def class_names(dataset: str) -> list[str]:
    """Label names, index = label (GTSRB's classes are known by number)."""
    return list(CIFAR10_CLASSES) if dataset == "cifar10" else [f"sign {i:02d}" for i in range(NUM_CLASSES[dataset])]


NUM_CLASSES = {"cifar10": 10, "gtsrb": 43}


class DatasetMissingError(FireError, FileNotFoundError):
    """The dataset archive could not be found; the message says where we looked and what to do."""


@dataclass(frozen=True)
class Split:
    """One split of a dataset: uint8 images (N, 32, 32, 3) and int64 labels (N,)."""

    images: np.ndarray
    labels: np.ndarray
    num_classes: int

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int, seed: int = 0) -> Split:
        """A random class-mixed subset of ``n`` samples (deterministic for a seed)."""
        idx = np.random.default_rng(seed).permutation(len(self))[: min(n, len(self))]
        idx.sort()
        return Split(self.images[idx], self.labels[idx], self.num_classes)


def data_dir() -> Path:
    """The directory that holds the dataset archives, or a clear error naming ``$FIRE_DATA_DIR``."""
    env = os.environ.get(DATA_ENV)
    candidates = (
        [Path(env)] if env else [PROJECT_ROOT.parent / "shared" / "datasets", Path.cwd().parent / "shared" / "datasets"]
    )
    for path in candidates:
        if path.is_dir():
            return path
    where = ", ".join(str(p) for p in candidates)
    raise DatasetMissingError(
        f"dataset directory not found (looked in: {where}). Set {DATA_ENV} to a directory holding "
        f"{' and '.join(ARCHIVES.values())} (see shared/datasets/README.md for the layout)."
    )


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    if arr.shape != (32, 32, 3):
        raise InvalidInputError(f"expected a 32x32 RGB image, got shape {arr.shape}")
    return arr


def _read_cifar10(archive: Path) -> dict[str, np.ndarray]:
    images: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    labels: dict[str, list[int]] = {"train": [], "test": []}
    with tarfile.open(archive, "r:xz") as tar:
        for member in tqdm(tar, desc="decoding CIFAR-10", unit="img", total=60_010, leave=False, disable=None):
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or not parts[2].endswith(".jpg"):
                continue
            split, cls, _ = parts
            images[split].append(_decode(tar.extractfile(member).read()))
            labels[split].append(CIFAR10_CLASSES.index(cls))
    return {
        f"{s}_{k}": np.stack(v) if k == "images" else np.asarray(v, dtype=np.int64)
        for s in ("train", "test")
        for k, v in (("images", images[s]), ("labels", labels[s]))
    }


def _read_gtsrb(archive: Path) -> dict[str, np.ndarray]:
    train_x, train_y, test_files = [], [], {}
    test_labels: dict[str, int] = {}
    with tarfile.open(archive, "r:xz") as tar:
        for member in tqdm(tar, desc="decoding GTSRB", unit="img", total=51_900, leave=False, disable=None):
            if not member.isfile():
                continue
            name = member.name
            if "/Final_Training/Images/" in name and name.endswith(".ppm"):
                train_x.append(_decode(tar.extractfile(member).read()))
                train_y.append(int(name.split("/")[-2]))
            elif "/Final_Test/Images/" in name and name.endswith(".ppm"):
                test_files[name.rsplit("/", 1)[1]] = _decode(tar.extractfile(member).read())
            elif name.endswith("GT-final_test.csv"):
                rows = csv.DictReader(io.StringIO(tar.extractfile(member).read().decode()), delimiter=";")
                test_labels = {r["Filename"]: int(r["ClassId"]) for r in rows}
    if not test_labels:
        raise InvalidInputError(f"{archive}: GT-final_test.csv not found in the archive")
    names = sorted(test_files)
    return {
        "train_images": np.stack(train_x),
        "train_labels": np.asarray(train_y, dtype=np.int64),
        "test_images": np.stack([test_files[n] for n in names]),
        "test_labels": np.asarray([test_labels[n] for n in names], dtype=np.int64),
    }


_READERS = {"cifar10": _read_cifar10, "gtsrb": _read_gtsrb}


def load_dataset(name: str, split: str) -> Split:
    """Load ``split`` ("train" or "test") of dataset ``name`` ("cifar10" or "gtsrb")."""
    if name not in ARCHIVES:
        raise InvalidInputError(f"unknown dataset {name!r}; choose one of {sorted(ARCHIVES)}")
    if split not in ("train", "test"):
        raise InvalidInputError(f"unknown split {split!r}; choose 'train' or 'test'")
    cache = cache_dir() / f"{name}.npz"
    if not cache.exists():
        archive = data_dir() / ARCHIVES[name]
        if not archive.is_file():
            raise DatasetMissingError(f"{archive} is missing. Set {DATA_ENV} to a directory holding {ARCHIVES[name]}.")
        arrays = _READERS[name](archive)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(cache)  # atomic: a killed decode never leaves a half-written cache
    with np.load(trusted_file(cache), allow_pickle=False) as npz:  # the cache's: this user's, not writable by others
        return Split(npz[f"{split}_images"], npz[f"{split}_labels"], NUM_CLASSES[name])


def to_tensor_batch(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC images -> float32 NCHW in [0, 1], the served model's input format."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)
