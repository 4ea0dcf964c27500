"""``fire train`` and ``fire rescore``: the attack zoo's models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fire_cli.common import add_attack_args, add_command, attack_spec


def train(a: argparse.Namespace) -> None:
    from zoo.train import TrainConfig, train

    spec = attack_spec(a, "badnets")
    cfg = TrainConfig(
        dataset=a.dataset,
        arch=a.arch,
        widths=tuple(a.widths),
        blocks=a.blocks,
        attack=spec["name"],
        attack_params={k: v for k, v in spec.items() if k != "name"},
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        hflip=not a.no_hflip,
        train_subset=a.train_subset,
        seed=a.seed,
        threads=a.threads,
    )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text("fire " + " ".join(sys.argv[1:]) + "\n")
    train(cfg, out)


def rescore(a: argparse.Namespace) -> None:
    from zoo.train import rescore

    m = rescore(a.model)
    print(f"{a.model}: CA {100 * m['CA']:.2f}%  ASR {100 * m['ASR']:.2f}%  PA {100 * m['PA']:.2f}%")


def register(sub) -> None:
    t = add_command(sub, "train", "train a backdoored model (resumable, checkpoint per epoch)", train)
    t.add_argument("--dataset", default="cifar10", choices=["cifar10", "gtsrb"])
    t.add_argument("--arch", default="resnet_small")
    t.add_argument("--widths", type=int, nargs=3, default=[16, 32, 64])
    t.add_argument("--blocks", type=int, default=1)
    add_attack_args(t, None)
    t.add_argument("--epochs", type=int, default=8)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--no-hflip", action="store_true", help="no horizontal flips (use for traffic signs)")
    t.add_argument("--train-subset", type=int, default=0, help="train on N random images (0 = all)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=0)
    t.add_argument("--out", required=True, help="model directory to write")

    r = add_command(sub, "rescore", "re-measure a trained model's CA / ASR / PA and update model.json", rescore)
    r.add_argument("--model", required=True)
