"""A model split at a layer, run in process with torch: features of images, predictions from features.

Auto-calibration and the efficacy benchmark use this to try many layers and settings quickly; the
served path (ONNX / TensorRT halves behind Triton) computes the same functions (``fire export``
checks the halves against torch to ~1e-6)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from calibration.estimators import clean_threshold, principal_basis
from fire_backend.data import to_tensor_batch
from fire_backend.directions import DirectionFile
from fire_backend.repair import Repair
from fire_backend.split import split_at

Editor = Callable[[torch.Tensor], torch.Tensor]  # features -> repaired features


class SplitRunner:
    """``model`` cut after ``layer``: ``features(images)`` runs the head, ``labels(features)`` the tail."""

    def __init__(self, model: nn.Module, layer: str, batch_size: int = 500):
        model.eval()
        self.layer, self.batch_size = layer, batch_size
        self.split = split_at(model, layer)

    @torch.inference_mode()
    def features(self, images: np.ndarray) -> torch.Tensor:
        chunks = [
            self.split.head(torch.from_numpy(to_tensor_batch(images[i : i + self.batch_size])))
            for i in range(0, len(images), self.batch_size)
        ]
        return torch.cat(chunks) if chunks else torch.zeros(0)

    @torch.inference_mode()
    def labels(self, features: torch.Tensor, edit: Editor | None = None) -> np.ndarray:
        """Predicted labels from features, repaired by ``edit`` first when given."""
        out = []
        for i in range(0, len(features), self.batch_size):
            f = features[i : i + self.batch_size]
            out.append(self.split.tail(edit(f) if edit else f).argmax(1).numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    @torch.inference_mode()
    def labels_after(self, features: torch.Tensor, base: np.ndarray, edit: Editor) -> np.ndarray:
        """Labels after ``edit``, re-running the tail only on rows the edit changed (``base``: the
        labels of the unedited features). Exact, and much faster for project / gated repairs."""
        edited = edit(features)
        changed = (edited != features).reshape(len(features), -1).any(dim=1).numpy()
        out = base.copy()
        if changed.any():
            out[changed] = self.labels(edited[torch.from_numpy(changed)])
        return out


@dataclass
class FitInputs:
    """Features the defender has at one layer: paired clean / triggered calibration images and clean ones."""

    pair_clean: torch.Tensor
    pair_poisoned: torch.Tensor
    clean: torch.Tensor  # for mu and the gated threshold


def fit_directions(
    inputs: FitInputs,
    layer: str,
    mode: str = "project",
    alpha: float = 1.0,
    rank: int = 1,
    fpr: float = 0.01,
    estimator: str = "paired",
    head_sha256: str = "in-process",
    beta: torch.Tensor | None = None,
) -> DirectionFile:
    """A direction file (in memory) from features: beta = mean paired difference unless given."""
    diffs = (inputs.pair_poisoned - inputs.pair_clean).double()
    if beta is None:
        beta = diffs.mean(0).float()
    mu = inputs.clean.double().mean(0).float()
    basis = None
    if rank > 1:
        basis = torch.from_numpy(principal_basis(diffs.numpy(), rank)).reshape(-1, *beta.shape)
    d = DirectionFile(
        beta=beta,
        mu=mu,
        threshold=0.0,
        layer=layer,
        mode=mode,
        alpha=alpha,
        head_sha256=head_sha256,
        estimator=estimator,
        n_poisoned=len(inputs.pair_poisoned),
        n_clean=len(inputs.clean),
        fpr=fpr,
        basis=basis,
    )
    d.threshold = clean_threshold(Repair(d).scores(inputs.clean).numpy(), fpr)
    return d


class ChainRunner:
    """``model`` cut after several layers (in order): head -> edit 1 -> middle -> edit 2 -> ... -> tail,
    as the multi-layer ensemble runs it. ``parts[i]`` ends right after ``layers[i]``."""

    def __init__(self, model: nn.Module, layers: list[str], batch_size: int = 500):
        model.eval()
        self.layers, self.batch_size = list(layers), batch_size
        self.parts: list[nn.Module] = []
        rest: nn.Module = model
        for i, layer in enumerate(layers):
            s = split_at(rest, layer, keep=tuple(layers[i + 1 :]))
            self.parts.append(s.head)
            rest = s.tail
        self.parts.append(rest)

    @torch.inference_mode()
    def run(self, images: np.ndarray, edits: list[Editor | None], stop: int | None = None) -> torch.Tensor:
        """Run with ``edits[i]`` applied after ``layers[i]``; ``stop=i`` returns the (unedited)
        features after ``layers[i]`` instead of logits."""
        out = []
        for i in range(0, len(images), self.batch_size):
            x = torch.from_numpy(to_tensor_batch(images[i : i + self.batch_size]))
            for k, part in enumerate(self.parts):
                x = part(x)
                if k == stop:
                    break
                if k < len(edits) and edits[k] is not None:
                    x = edits[k](x)
            out.append(x)
        return torch.cat(out)
