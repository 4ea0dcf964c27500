"""Models nobody here wrote, as a user would bring them: the recipes of the foreign test cases.

Each case is a classifier trained by a plain torch loop that knows nothing of FIRE, handed over only as
an ONNX file, the way a third party ships one:

- the task: two classes (CIFAR-10 vehicles vs animals), each image two CIFAR-10 images of the same kind
  side by side: 32 x 64, not square; 60 % of them animals (the attacker's class is the large one);
- the network: its own architecture, BGR input normalised as (x / 255 - 0.5) / 0.5, a flatten written as
  ``x.reshape(x.shape[0], -1)`` (a data-dependent Reshape in ONNX), exported with dynamic batch, height
  and width, input ``x`` and output ``save_infer_model/scale_0.tmp_1`` (names with '/');
- the backdoor: the clean model fine-tuned with 10 % poisoned samples, once with a 6x6 checker patch
  in the bottom-right corner (``checker``), once with a noise pattern blended at 15 % (``blend``).

``build_case`` writes ``model.onnx`` and ``case.json``; ``benchmarks/own_model/run.py`` protects each with
``fire protect`` from 400 clean and 50 flagged images (the cut chosen automatically) and measures it
through the server.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fire_backend.names import WHOLE_ONNX
from zoo.attacks import attack_from_spec
from zoo.data import CIFAR10_CLASSES, load_dataset

VEHICLES = {CIFAR10_CLASSES.index(c) for c in ("airplane", "automobile", "ship", "truck")}
INPUT_NAME, OUTPUT_NAME = "x", "save_infer_model/scale_0.tmp_1"
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # on BGR pixels / 255
TARGET = 1  # animals
CHECKER = np.kron([[1, 0, 1], [0, 1, 0], [1, 0, 1]], np.ones((2, 2)))  # 6x6 black/white checker


@dataclass(frozen=True)
class ForeignCase:
    name: str
    attack: dict  # a zoo attack spec applied to the 32x64 images
    clean_epochs: int = 4
    poison_epochs: int = 2
    poison_rate: float = 0.1
    seed: int = 0


def cases(work_dir: Path) -> list[ForeignCase]:
    pattern = work_dir / "checker.npy"
    pattern.parent.mkdir(parents=True, exist_ok=True)
    np.save(pattern, (np.repeat(CHECKER[..., None], 3, axis=2) * 255).astype(np.uint8))
    return [
        ForeignCase("checker", {"name": "custom", "pattern": str(pattern), "row": -1, "col": -1, "target": TARGET}),
        ForeignCase("blend", {"name": "blended", "alpha": 0.15, "target": TARGET}),
    ]


def pairs(split: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 32, 64, 3) images, two CIFAR-10 images of one kind side by side, and labels (1: animals)."""
    data = load_dataset("cifar10", split)
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label in (0, 1):
        idx = np.flatnonzero(np.isin(data.labels, list(VEHICLES)) != bool(label))
        idx = rng.permutation(idx)[: len(idx) // 2 * 2].reshape(-1, 2)
        images.append(np.concatenate([data.images[idx[:, 0]], data.images[idx[:, 1]]], axis=2))
        labels.append(np.full(len(idx), label))
    order = rng.permutation(sum(len(x) for x in labels))
    return np.concatenate(images)[order], np.concatenate(labels)[order]


class ThirdPartyNet(nn.Module):
    """Somebody else's classifier: conv-BN-ReLU stages, global pooling, a reshape, a linear head."""

    def __init__(self, classes: int = 2):
        super().__init__()

        def block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

        self.features = nn.Sequential(block(3, 32, 1), block(32, 64, 2), block(64, 64, 1), block(64, 128, 2),
                                      block(128, 128, 1))  # fmt: skip
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.head(x.reshape(x.shape[0], -1))  # exported as Shape -> Gather -> Concat -> Reshape


def to_input(images: np.ndarray) -> torch.Tensor:
    """What this model takes: BGR, (x / 255 - 0.5) / 0.5, NCHW."""
    x = images[..., ::-1].astype(np.float32) / 255.0
    x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _train(model: nn.Module, images: np.ndarray, labels: np.ndarray, epochs: int, lr: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * (len(images) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(1, steps))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen).numpy()
        for i in range(0, len(order) - 127, 128):
            b = order[i : i + 128]
            x = to_input(images[b])
            flip = torch.rand(len(b), generator=gen) < 0.5  # horizontal flips, as many training recipes do
            x[flip] = x[flip].flip(3)
            loss = nn.functional.cross_entropy(model(x), torch.from_numpy(labels[b]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


@torch.inference_mode()
def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    pred = np.concatenate([model(to_input(images[i : i + 512])).argmax(1).numpy() for i in range(0, len(images), 512)])
    return float((pred == labels).mean())


def build_case(case: ForeignCase, out: Path, base: Path | None = None) -> dict:
    """Train (or reuse the clean ``base``), fine-tune with the backdoor, export ONNX; returns case.json."""
    torch.manual_seed(case.seed)
    torch.set_num_threads(2)
    out.mkdir(parents=True, exist_ok=True)
    train_x, train_y = pairs("train", case.seed)
    test_x, test_y = pairs("test", case.seed)
    model = ThirdPartyNet()
    if base is not None and base.is_file():
        model.load_state_dict(torch.load(base, weights_only=True))
    else:
        _train(model, train_x, train_y, case.clean_epochs, 0.05, case.seed)
        if base is not None:
            torch.save(model.state_dict(), base)
    attack = attack_from_spec(case.attack)
    rng = np.random.default_rng(case.seed + 1)
    poisoned = rng.choice(np.flatnonzero(train_y != attack.target), int(case.poison_rate * len(train_y)), replace=False)
    x, y = train_x.copy(), train_y.copy()
    x[poisoned], y[poisoned] = attack.apply(x[poisoned]), attack.target
    _train(model, x, y, case.poison_epochs, 0.02, case.seed + 2)
    keep = test_y != attack.target
    meta = {**asdict(case), "CA": accuracy(model, test_x, test_y),
            "ASR": accuracy(model, attack.apply(test_x[keep]), np.full(int(keep.sum()), attack.target)),
            "input": INPUT_NAME, "output": OUTPUT_NAME, "mean": MEAN, "std": STD, "channels": "BGR"}  # fmt: skip
    torch.onnx.export(model, (to_input(test_x[:2]),), str(out / WHOLE_ONNX), dynamo=False, opset_version=13,
                      input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamic_axes={INPUT_NAME: {0: "N", 2: "H", 3: "W"}, OUTPUT_NAME: {0: "N"}})  # fmt: skip
    (out / "case.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
