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
from tqdm import tqdm

from fire_backend.attacks import make_attack
from fire_backend.checkpoint import save_model
from fire_backend.data import load_dataset
from fire_backend.metrics import backdoor_metrics
from fire_backend.models import ModelConfig, build_model


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


def train(config: TrainConfig, out_dir: str | Path) -> dict[str, Any]:
    """Train a backdoored model per ``config`` into ``out_dir``; returns the recorded metadata."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)

    train_split = load_dataset(config.dataset, "train")
    if config.train_subset:
        train_split = train_split.subset(config.train_subset, seed=config.seed)
    attack = make_attack(config.attack, **config.attack_params)

    def poisoned(epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Attacks that ask for it (WaNet) poison a fresh draw of samples every epoch, as their papers do.
        seed = config.seed + (1000 * epoch if attack.fresh_poison_each_epoch else 0)
        images, labels, _ = attack.poison_training_set(
            train_split.images, train_split.labels, train_split.num_classes, seed=seed
        )
        return _to_float(images), torch.from_numpy(labels)

    x_all, y_all = poisoned(0)

    model_cfg = ModelConfig(config.arch, train_split.num_classes, tuple(config.widths), config.blocks)
    model = build_model(model_cfg)
    opt = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay, nesterov=True
    )
    steps_per_epoch = (len(y_all) + config.batch_size - 1) // config.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, config.lr, epochs=config.epochs, steps_per_epoch=steps_per_epoch, pct_start=0.25
    )
    start_epoch, history = 0, []
    ckpt_path = out_dir / "checkpoint.pt"
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=True)
        if ckpt["config"] != json.dumps(asdict(config), sort_keys=True):
            raise ValueError(f"{ckpt_path} was written for a different config; delete it to start over")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        gen.set_state(ckpt["generator"])
        start_epoch, history = ckpt["epoch"], json.loads(ckpt["history"])

    log = (out_dir / "train.log").open("a")
    for epoch in range(start_epoch, config.epochs):
        if attack.fresh_poison_each_epoch and epoch:
            x_all, y_all = poisoned(epoch)
        model.train()
        t0, total_loss, correct = time.time(), 0.0, 0
        perm = torch.randperm(len(y_all), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", unit="step", leave=False)
        for step in bar:
            idx = perm[step * config.batch_size : (step + 1) * config.batch_size]
            xb, yb = _augment(x_all[idx], config.hflip, gen), y_all[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            bar.set_postfix(loss=f"{loss.item():.3f}")
        row = {
            "epoch": epoch + 1,
            "loss": total_loss / len(y_all),
            "train_acc": correct / len(y_all),
            "seconds": round(time.time() - t0, 1),
        }
        history.append(row)
        log.write(json.dumps(row) + "\n")
        log.flush()
        print(f"epoch {epoch + 1}: loss {row['loss']:.4f} train acc {row['train_acc']:.4f} ({row['seconds']} s)")
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "generator": gen.get_state(),
                "epoch": epoch + 1,
                "history": json.dumps(history),
                "config": json.dumps(asdict(config), sort_keys=True),
            },
            ckpt_path,
        )

    model.eval()
    test = load_dataset(config.dataset, "test")
    with torch.inference_mode():
        m = backdoor_metrics(lambda x: model(torch.from_numpy(x)).numpy(), test, attack, desc="test")
    meta = {
        "train_config": asdict(config),
        "attack": attack.spec(),
        "dataset": config.dataset,
        "metrics": {"CA": m.ca, "ASR": m.asr, "PA": m.pa, "n_clean": m.n_clean, "n_triggered": m.n_triggered},
        "history": history,
        "torch": torch.__version__,
    }
    save_model(out_dir, model, model_cfg, meta)
    log.write(json.dumps({"test": meta["metrics"]}) + "\n")
    log.close()
    ckpt_path.unlink(missing_ok=True)
    print(f"test: CA {100 * m.ca:.2f}%  ASR {100 * m.asr:.2f}%  PA {100 * m.pa:.2f}%  -> {out_dir}")
    return meta


def rescore(model_dir: str | Path) -> dict[str, Any]:
    """Re-measure a trained model's CA / ASR / PA on the test split and update model.json (the weights
    are untouched; the change is appended to train.log). For when the metric code changed after training."""
    from fire_backend.checkpoint import META, load_model

    model_dir = Path(model_dir)
    model, meta = load_model(model_dir)
    attack = make_attack(meta["attack"]["name"], **{k: v for k, v in meta["attack"].items() if k != "name"})
    with torch.inference_mode():
        m = backdoor_metrics(
            lambda x: model(torch.from_numpy(x)).numpy(), load_dataset(meta["dataset"], "test"), attack
        )
    new = {"CA": m.ca, "ASR": m.asr, "PA": m.pa, "n_clean": m.n_clean, "n_triggered": m.n_triggered}
    with (model_dir / "train.log").open("a") as log:
        log.write(json.dumps({"rescored": new, "previous": meta["metrics"]}) + "\n")
    meta["metrics"] = new
    (model_dir / META).write_text(json.dumps(meta, indent=2) + "\n")
    return new
