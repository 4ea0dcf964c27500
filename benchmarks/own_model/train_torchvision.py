"""Train a standard torchvision network with a BadNets backdoor, with a plain torch loop (not FIRE's
training code), and export it the way a user would: ``torch.onnx.export`` and ``torch.jit.trace``.

The result is a model this project's own training loop did not make, handed to FIRE only as files.
torchvision does not import beside this project's CPU torch build, so this runs in its own environment:

    bash scripts/torchvision_env.sh       # .venv-torchvision: torch 2.14.1 + torchvision 0.29.1
    .venv-torchvision/bin/python -m benchmarks.own_model.train_torchvision --out models/own_mobilenet_v3_small

Writes ``model.onnx``, ``model.torchscript.pt`` and ``train.json`` (config, per-epoch log, test CA / ASR / PA).
The network takes CIFAR-normalised input (mean/std outside the model), so FIRE must be told the
preprocessing: ``--mean 0.4914 0.4822 0.4465 --std 0.2470 0.2435 0.2616``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from zoo.attacks import make_attack
from zoo.data import load_dataset

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def build(num_classes: int) -> torch.nn.Module:
    """torchvision's MobileNetV3-Small, its stem stride set to 1 for 32x32 inputs."""
    model = torchvision.models.mobilenet_v3_small(num_classes=num_classes)
    model.features[0][0].stride = (1, 1)
    return model


def preprocess(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    i, j = torch.randint(0, 9, (2,), generator=gen).tolist()
    out = padded[:, :, i : i + h, j : j + w]
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


@torch.inference_mode()
def predict(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    model.eval()
    chunks = [model(preprocess(images[i : i + 500])).argmax(1).numpy() for i in range(0, len(images), 500)]
    return np.concatenate(chunks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = load_dataset("cifar10", "train"), load_dataset("cifar10", "test")
    attack = make_attack("badnets")  # 3x3 white patch bottom-right, target 0, 10 % poisoned
    images, labels, _ = attack.poison_training_set(train.images, train.labels, train.num_classes, seed=a.seed)
    x_all, y_all = preprocess(images), torch.from_numpy(labels)
    model = build(train.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9, weight_decay=4e-5, nesterov=True)
    steps = (len(y_all) + 127) // 128
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, a.lr, epochs=a.epochs, steps_per_epoch=steps, pct_start=0.2)
    gen = torch.Generator().manual_seed(a.seed)
    log = []
    for epoch in range(a.epochs):
        model.train()
        t0, total, correct = time.time(), 0.0, 0
        perm = torch.randperm(len(y_all), generator=gen)
        for s in range(steps):
            idx = perm[s * 128 : (s + 1) * 128]
            logits = model(augment(x_all[idx], gen))
            loss = F.cross_entropy(logits, y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y_all[idx]).sum())
        row = {"epoch": epoch + 1, "loss": total / len(y_all), "train_acc": correct / len(y_all)}
        row["s"] = round(time.time() - t0)
        log.append(row)
        print(json.dumps(row), flush=True)
    keep = attack.counts_for_asr(test.labels)
    clean, trig = predict(model, test.images), predict(model, attack.apply(test.images[keep]))
    metrics = {
        "CA": float((clean == test.labels).mean()),
        "ASR": float((trig == attack.target).mean()),
        "PA": float((trig == test.labels[keep]).mean()),
    }
    print(json.dumps(metrics), flush=True)
    model.eval()
    example = preprocess(test.images[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(out / "model.onnx"), dynamo=False, opset_version=17,
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                          input_names=["input"], output_names=["output"])  # fmt: skip
        torch.jit.trace(model, example).save(str(out / "model.torchscript.pt"))
    (out / "train.json").write_text(json.dumps({
        "architecture": "torchvision.models.mobilenet_v3_small(num_classes=10), features[0][0].stride = (1, 1)",
        "torch": torch.__version__, "torchvision": torchvision.__version__, "attack": attack.spec(),
        "preprocess": {"mean": MEAN, "std": STD, "divisor": 255, "layout": "NCHW", "channels": "RGB"},
        "config": vars(a), "log": log, "test": metrics,
    }, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
