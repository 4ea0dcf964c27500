"""A model split at a layer, run in process with torch: features of images, predictions from features.

Auto-calibration and the efficacy benchmark use this to try many layers and settings quickly; the
served path (ONNX / TensorRT halves behind Triton) computes the same functions (``fire export``
checks the halves against torch to ~1e-6)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from modelio.preprocess import Preprocess
from modelio.split import split_at
from zoo.data import to_tensor_batch

Editor = Callable[[torch.Tensor], torch.Tensor]  # features -> repaired features


class SplitRunner:
    """``model`` cut after ``layer``: ``features(images)`` runs the head, ``labels(features)`` the tail."""

    def __init__(self, model: nn.Module, layer: str, batch_size: int = 500, preprocess: Preprocess | None = None):
        model.eval()
        self.layer, self.batch_size = layer, batch_size
        self.split = split_at(model, layer)
        self.prepare = preprocess.apply if preprocess else to_tensor_batch  # zoo models: pixels in [0, 1]

    @torch.inference_mode()
    def features(self, images: np.ndarray) -> torch.Tensor:
        chunks = [
            self.split.head(torch.from_numpy(self.prepare(images[i : i + self.batch_size])))
            for i in range(0, len(images), self.batch_size)
        ]
        return torch.cat(chunks) if chunks else torch.zeros(0)

    @torch.inference_mode()
    def outputs(self, features: torch.Tensor, edit: Editor | None = None) -> np.ndarray:
        """The model's outputs (N, classes) from features, repaired by ``edit`` first when given."""
        out = []
        for i in range(0, len(features), self.batch_size):
            f = features[i : i + self.batch_size]
            out.append(self.split.tail(edit(f) if edit else f).reshape(len(f), -1).float().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)

    def labels(self, features: torch.Tensor, edit: Editor | None = None) -> np.ndarray:
        """Predicted labels from features, repaired by ``edit`` first when given."""
        return self.outputs(features, edit).argmax(1) if len(features) else np.zeros(0, dtype=np.int64)

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
