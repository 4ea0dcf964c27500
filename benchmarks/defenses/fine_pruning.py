"""Fine-pruning (Liu et al., "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural
Networks", RAID 2018), and fine-tuning alone (``prune=0``).

Pruning: the channels of the model's last convolutional feature map (``layers.last_feature_map``: for
the zoo's ResNets the last stage's output, not the 1x1 shortcut projection that ``modules()`` order
happens to list last) are ranked by their mean activation on the defender's clean images, and the
least active ``prune`` share is removed (masked to zero for every input: backdoor neurons are the ones
clean inputs leave dormant). Then the whole network is fine-tuned on the same clean images (10 epochs,
SGD, horizontal flips). A model defense: no cost per request, a one-off training cost.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.defenses.base import Context, Defense, Outcome, predict
from benchmarks.defenses.layers import last_feature_map
from zoo.data import to_tensor_batch


class FinePruning(Defense):
    kind = "model"

    def __init__(self, prune: float = 0.3, epochs: int = 10, lr: float = 0.01):
        self.prune, self.epochs, self.lr = prune, epochs, lr
        self.name = f"fine-pruning ({prune:.0%} pruned)" if prune else "fine-tuning"

    def fit(self, ctx: Context) -> None:
        t0 = time.time()
        model = copy.deepcopy(ctx.model).eval()
        x, y = torch.from_numpy(to_tensor_batch(ctx.clean)), torch.from_numpy(ctx.clean_labels.astype(np.int64))
        self.pruned = []
        if self.prune:
            layer = last_feature_map(model, x[:2])
            acts = []
            handle = layer.register_forward_hook(lambda _m, _i, out: acts.append(out.detach().mean((0, 2, 3))))
            with torch.no_grad():
                for i in range(0, len(x), 250):
                    model(x[i : i + 250])
            handle.remove()
            mean = torch.stack(acts).mean(0)
            self.pruned = torch.argsort(mean)[: int(self.prune * len(mean))]
            mask = torch.ones(len(mean))
            mask[self.pruned] = 0
            layer.register_forward_hook(lambda _m, _i, out: out * mask.view(1, -1, 1, 1))
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)
        gen = torch.Generator().manual_seed(ctx.seed)
        for _ in range(self.epochs):
            for idx in torch.randperm(len(y), generator=gen).split(64):
                xb = x[idx].flip(3) if bool(torch.rand(1, generator=gen) < 0.5) else x[idx]
                loss = F.cross_entropy(model(xb), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.model = model.eval()
        self.seconds = time.time() - t0

    def __call__(self, images: np.ndarray) -> Outcome:
        return Outcome(predict(self.model, images))
