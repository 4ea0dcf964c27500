"""Februus-style restoration (Doan et al., "Februus: Input Purification Defense Against Trojan Attacks on
Deep Neural Network Systems", ACSAC 2020), without its GAN: every input is explained with Grad-CAM
(Selvaraju et al. 2017) at the model's last feature map for the class it is predicted as; the region
whose normalised heat exceeds ``tau`` is removed and filled in by OpenCV's inpainting (Telea's method,
where Februus uses a GAN trained on clean data), and the restored image is classified again. A
trigger that decides the prediction draws the heat: removing it gives the input its own label back.
It rejects nothing; it serves the restored label (and changes clean inputs a little too: the clean
accuracy it costs is in the table). Cost: a forward and backward pass, the inpainting, a forward pass.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.defenses.base import Context, Defense, Outcome, predict
from benchmarks.defenses.layers import last_feature_map
from zoo.data import to_tensor_batch


class Februus(Defense):
    name, kind = "Februus-style (Grad-CAM + inpainting)", "restore"

    def __init__(self, tau: float = 0.7, radius: int = 3):
        self.tau, self.radius = tau, radius

    def fit(self, ctx: Context) -> None:
        self.model = ctx.model.eval()
        self.layer = last_feature_map(self.model, torch.from_numpy(to_tensor_batch(ctx.clean[:2])))

    def heat(self, images: np.ndarray) -> np.ndarray:
        """Grad-CAM of the predicted class, upsampled to the input and scaled to [0, 1] per image."""
        x = torch.from_numpy(to_tensor_batch(images))
        store = {}
        handle = self.layer.register_forward_hook(lambda _m, _i, out: store.__setitem__("a", out))
        try:
            with torch.enable_grad():
                out = self.model(x)
                chosen = out.gather(1, out.argmax(1, keepdim=True)).sum()
                (grads,) = torch.autograd.grad(chosen, store["a"])
        finally:
            handle.remove()
        weights = grads.mean((2, 3), keepdim=True)
        cam = F.relu((weights * store["a"]).sum(1, keepdim=True)).detach()
        cam = F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]
        low, high = cam.amin((1, 2), keepdim=True), cam.amax((1, 2), keepdim=True)
        return ((cam - low) / (high - low).clamp_min(1e-12)).numpy()

    def restore(self, images: np.ndarray) -> np.ndarray:
        out = images.copy()
        for i in range(0, len(images), 250):
            masks = (self.heat(images[i : i + 250]) > self.tau).astype(np.uint8)
            for j, mask in enumerate(masks):
                out[i + j] = cv2.inpaint(np.ascontiguousarray(images[i + j]), mask, self.radius, cv2.INPAINT_TELEA)
        return out

    def __call__(self, images: np.ndarray) -> Outcome:
        return Outcome(predict(self.model, self.restore(images)))
