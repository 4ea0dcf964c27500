"""One training loop for every model and attack: poison the training split, train, record.

Resumable: a ``checkpoint.pt`` (tensors and plain numbers only; read back with ``weights_only=True``)
is written after every epoch; training picks up from it. The finished model is written as
``model.safetensors`` + ``model.json`` (config, seed, attack, CA/ASR/PA) + ``train.log``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fire_backend.errors import InvalidInputError
from zoo.attacks import Attack, attack_from_spec, make_attack
from zoo.checkpoint import save_model
from zoo.data import load_dataset
from zoo.metrics import backdoor_metrics
from zoo.models import ModelConfig, build_model


@dataclass
class TrainConfig:
    dataset: str = "cifar10"
    arch: str = "resnet_small"
    widths: tuple[int, ...] = (16, 32, 64)
    blocks: int = 1
    attack: str = "badnets"
    attack_params: dict[str, Any] = field(default_factory=dict)
    epochs: int = 8
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    hflip: bool = True  # off for traffic signs, where a mirror image can change the meaning
    train_subset: int = 0  # 0 = the whole training split (tests use a few thousand)
    seed: int = 0
    threads: int = 0  # 0 = torch's default


def _augment(x: torch.Tensor, hflip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crop (reflect-pad 4) and optional horizontal flip, drawn per sample."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    rows = torch.randint(0, 9, (n, 1), generator=gen) + torch.arange(h)  # (n, h)
    cols = torch.randint(0, 9, (n, 1), generator=gen) + torch.arange(w)  # (n, w)
    batch = torch.arange(n)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (n, c, h, w)
    if hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out


def _to_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


class _Poisoned:
    """The training split with the attack applied, as float tensors; re-drawn per epoch when the attack
    asks for it (WaNet), as its paper does."""

    def __init__(self, config: TrainConfig):
        split = load_dataset(config.dataset, "train")
        self.split = split.subset(config.train_subset, seed=config.seed) if config.train_subset else split
        self.attack = make_attack(config.attack, **config.attack_params)
        self.seed = config.seed
        self.x, self.y = self._draw(0)

    def _draw(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        seed = self.seed + (1000 * epoch if self.attack.fresh_poison_each_epoch else 0)
        images, labels, _ = self.attack.poison_training_set(
            self.split.images, self.split.labels, self.split.num_classes, seed=seed
        )
        return _to_float(images), torch.from_numpy(labels)

    def for_epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.attack.fresh_poison_each_epoch and epoch:
            self.x, self.y = self._draw(epoch)
        return self.x, self.y


@dataclass
class _State:
    """Everything a resumed run needs: written to ``checkpoint.pt`` after every epoch (tensors and plain
    numbers only, read back with ``weights_only=True``)."""

    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    gen: torch.Generator
    epoch: int = 0
    history: list[dict] = field(default_factory=list)

    def save(self, path: Path, config: TrainConfig) -> None:
        torch.save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "generator": self.gen.get_state(),
                "epoch": self.epoch,
                "history": json.dumps(self.history),
                "config": json.dumps(asdict(config), sort_keys=True),
            },
            path,
        )

    def resume(self, path: Path, config: TrainConfig) -> None:
        if not path.exists():
            return
        ckpt = torch.load(path, weights_only=True)
        if ckpt["config"] != json.dumps(asdict(config), sort_keys=True):
            raise InvalidInputError(f"{path} was written for a different config; delete it to start over")
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.gen.set_state(ckpt["generator"])
        self.epoch, self.history = ckpt["epoch"], json.loads(ckpt["history"])


def _setup(config: TrainConfig, num_classes: int, steps_per_epoch: int) -> tuple[ModelConfig, _State]:
    model_cfg = ModelConfig(config.arch, num_classes, tuple(config.widths), config.blocks)
    model = build_model(model_cfg)
    opt = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay, nesterov=True
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, config.lr, epochs=config.epochs, steps_per_epoch=steps_per_epoch, pct_start=0.25
    )
    return model_cfg, _State(model, opt, sched, torch.Generator().manual_seed(config.seed))


def _epoch(state: _State, x: torch.Tensor, y: torch.Tensor, config: TrainConfig, steps: int) -> dict:
    """One pass over the poisoned training set; returns the epoch's log row."""
    model, gen = state.model, state.gen
    model.train()
    t0, total_loss, correct = time.time(), 0.0, 0
    perm = torch.randperm(len(y), generator=gen)
    bar = tqdm(range(steps), desc=f"epoch {state.epoch + 1}/{config.epochs}", unit="step", leave=False,
               disable=None)  # fmt: skip
    for step in bar:
        idx = perm[step * config.batch_size : (step + 1) * config.batch_size]
        xb, yb = _augment(x[idx], config.hflip, gen), y[idx]
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        state.opt.zero_grad(set_to_none=True)
        loss.backward()
        state.opt.step()
        state.sched.step()
        total_loss += loss.item() * len(yb)
        correct += int((logits.argmax(1) == yb).sum())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return {
        "epoch": state.epoch + 1,
        "loss": total_loss / len(y),
        "train_acc": correct / len(y),
        "seconds": round(time.time() - t0, 1),
    }


def _test_metrics(model: nn.Module, dataset: str, attack: Attack, desc: str = "") -> dict[str, Any]:
    model.eval()
    test = load_dataset(dataset, "test")
    with torch.inference_mode():
        m = backdoor_metrics(lambda x: model(torch.from_numpy(x)).numpy(), test, attack, desc=desc)
    return {"CA": m.ca, "ASR": m.asr, "PA": m.pa, "n_clean": m.n_clean, "n_triggered": m.n_triggered}


def train(config: TrainConfig, out_dir: str | Path) -> dict[str, Any]:
    """Train a backdoored model per ``config`` into ``out_dir``; returns the recorded metadata."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    data = _Poisoned(config)
    steps = (len(data.y) + config.batch_size - 1) // config.batch_size
    model_cfg, state = _setup(config, data.split.num_classes, steps)
    ckpt_path = out_dir / "checkpoint.pt"
    state.resume(ckpt_path, config)
    with (out_dir / "train.log").open("a") as log:
        while state.epoch < config.epochs:
            row = _epoch(state, *data.for_epoch(state.epoch), config, steps)
            state.history.append(row)
            state.epoch += 1
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(f"epoch {row['epoch']}: loss {row['loss']:.4f} train acc {row['train_acc']:.4f} ({row['seconds']} s)")
            state.save(ckpt_path, config)
        metrics = _test_metrics(state.model, config.dataset, data.attack, desc="test")
        meta = {
            "train_config": asdict(config),
            "attack": data.attack.spec(),
            "dataset": config.dataset,
            "metrics": metrics,
            "history": state.history,
            "torch": torch.__version__,
        }
        save_model(out_dir, state.model, model_cfg, meta)
        log.write(json.dumps({"test": metrics}) + "\n")
    ckpt_path.unlink(missing_ok=True)
    ca, asr, pa = (100 * metrics[k] for k in ("CA", "ASR", "PA"))
    print(f"test: CA {ca:.2f}%  ASR {asr:.2f}%  PA {pa:.2f}%  -> {out_dir}")
    return meta


def rescore(model_dir: str | Path) -> dict[str, Any]:
    """Re-measure a trained model's CA / ASR / PA on the test split and update model.json (the weights
    are untouched; the change is appended to train.log). For when the metric code changed after training."""
    from zoo.checkpoint import META, load_model

    model_dir = Path(model_dir)
    model, meta = load_model(model_dir)
    new = _test_metrics(model, meta["dataset"], attack_from_spec(meta["attack"]))
    with (model_dir / "train.log").open("a") as log:
        log.write(json.dumps({"rescored": new, "previous": meta["metrics"]}) + "\n")
    meta["metrics"] = new
    (model_dir / META).write_text(json.dumps(meta, indent=2) + "\n")
    return new
