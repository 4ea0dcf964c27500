"""``fire train`` and ``fire rescore``: the attack zoo's models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fire_cli.common import add_attack_args, add_command, attack_spec
from fire_cli.options import add, add_fields, config_from


def train(a: argparse.Namespace) -> None:
    from zoo.train import TrainConfig, train

    spec = attack_spec(a, "badnets")
    params = {k: v for k, v in spec.items() if k != "name"}
    cfg = config_from(TrainConfig, a, TRAIN_FIELDS, attack=spec["name"], attack_params=params, hflip=not a.no_hflip)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text("fire " + " ".join(sys.argv[1:]) + "\n")
    train(cfg, out)


def rescore(a: argparse.Namespace) -> None:
    from zoo.train import rescore

    m = rescore(a.model_dir)
    print(f"{a.model_dir}: CA {100 * m['CA']:.2f}%  ASR {100 * m['ASR']:.2f}%  PA {100 * m['PA']:.2f}%")


TRAIN_FIELDS = {"dataset": "--dataset", "arch": "--arch", "widths": "--widths", "blocks": "--blocks",
                "epochs": "--epochs", "batch_size": "--train-batch-size", "lr": "--lr",
                "train_subset": "--train-subset", "seed": "--seed", "threads": "--threads"}  # fmt: skip


def register(sub) -> None:
    from zoo.train import TrainConfig

    t = add_command(sub, "train", "train a backdoored model (resumable, checkpoint per epoch)", train)
    add_fields(t, TrainConfig, TRAIN_FIELDS)
    add_attack_args(t)
    add(t, "--no-hflip")
    add(t, "--out", required=True, detail="the model directory")

    r = add_command(sub, "rescore", "re-measure a trained model's CA / ASR / PA and update model.json", rescore)
    add(r, "--model-dir", required=True)
