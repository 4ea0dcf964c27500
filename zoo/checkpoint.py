"""A trained model on disk: ``model.safetensors`` (weights) + ``model.json`` (architecture, training
config, attack, metrics). Loading never unpickles anything."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from fire_backend.errors import FireError
from zoo.attacks import resolve_trigger_files
from zoo.models import ModelConfig, build_model

WEIGHTS = "model.safetensors"
META = "model.json"


def save_model(directory: str | Path, model: nn.Module, config: ModelConfig, meta: dict[str, Any]) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, directory / WEIGHTS)
    (directory / META).write_text(json.dumps({"model": asdict(config), **meta}, indent=2) + "\n")


class ModelDirError(FireError):
    """Not a model directory `fire train` wrote, or a damaged one."""


def load_meta(directory: str | Path) -> dict[str, Any]:
    """model.json; trigger files its attack names by a relative path are taken relative to the directory."""
    directory = Path(directory)
    path = directory / META
    if not path.is_file():
        raise ModelDirError(f"{path} not found: is {directory} a model directory written by `fire train`?")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{path}: not valid JSON ({e})") from None
    if isinstance(meta.get("attack"), dict):
        meta["attack"] = resolve_trigger_files(meta["attack"], directory)
    return meta


def load_model(directory: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The model in eval mode, and its metadata."""
    meta = load_meta(directory)
    cfg = meta["model"]
    model = build_model(ModelConfig(**{**cfg, "widths": tuple(cfg["widths"])}))
    model.load_state_dict(load_file(Path(directory) / WEIGHTS))
    return model.eval(), meta


def clean_twins(models_dir: str | Path) -> dict[tuple[str, str], str]:
    """(dataset, arch) -> the model directory's name, for the models in ``models_dir`` trained without a
    backdoor (poison rate 0): what a backdoored model of that dataset (and architecture) is measured
    against."""
    out = {}
    for meta_path in sorted(Path(models_dir).glob(f"*/{META}")):
        meta = json.loads(meta_path.read_text())
        if meta.get("attack", {}).get("poison_rate", 1) == 0:
            out.setdefault((meta["dataset"], meta["model"]["arch"]), meta_path.parent.name)
    return out
