"""The model's last convolutional feature map (the layer Grad-CAM and fine-pruning work on), found by
running it: the last module, in execution order, whose output is a 4-D map larger than 1 x 1 (for the
zoo's ResNet and VGG, the last stage's output, after its residual add and ReLU)."""

from __future__ import annotations

import torch
from torch import nn


def last_feature_map(model: nn.Module, example: torch.Tensor) -> nn.Module:
    fired: list[nn.Module] = []

    def hook(module, _inputs, output):
        if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[2] * output.shape[3] > 1:
            fired.append(module)

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    if not fired:
        raise ValueError("the model has no 4-D feature map")
    return fired[-1]
