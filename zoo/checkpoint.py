"""A trained model on disk: ``model.safetensors`` (weights) + ``model.json`` (architecture, training
config, attack, metrics). Loading never unpickles anything."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from zoo.models import ModelConfig, build_model

WEIGHTS = "model.safetensors"
META = "model.json"


def save_model(directory: str | Path, model: nn.Module, config: ModelConfig, meta: dict[str, Any]) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, directory / WEIGHTS)
    (directory / META).write_text(json.dumps({"model": asdict(config), **meta}, indent=2) + "\n")


def load_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {directory} a model directory written by `fire train`?")
    return json.loads(path.read_text())


def load_model(directory: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The model in eval mode, and its metadata."""
    meta = load_meta(directory)
    cfg = meta["model"]
    model = build_model(ModelConfig(**{**cfg, "widths": tuple(cfg["widths"])}))
    model.load_state_dict(load_file(Path(directory) / WEIGHTS))
    return model.eval(), meta
