"""Where a user's PyTorch model comes from, loaded without unpickling anything untrusted.

- a TorchScript file (``torch.jit.save``): its own code and weights, no Python class needed;
- ``package.module:factory`` (an importable function or class returning an ``nn.Module``) plus weights;
- ``torchvision:NAME`` / ``timm:NAME``: an architecture by name (built without downloading anything) plus
  weights, with ``num_classes`` passed to the constructor.
Weights: ``.safetensors``, or a state dict in a ``.pt``/``.pth`` file read with ``torch.load(weights_only=True)``.
Code runs only from files no other account can have changed (``fire_backend.cache.trusted_code``: the
module, its packages' ``__init__`` files and what they import from outside the installed packages, a
TorchScript file).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import sysconfig
import zipfile
from pathlib import Path

import torch
from torch import nn

from fire_backend.cache import trusted_code
from fire_backend.errors import FireError
from fire_backend.names import INPUT, LOGITS


class ModelSourceError(FireError, ValueError):
    """The model cannot be loaded as given; the message says what was expected."""


def is_torchscript(path: str | Path) -> bool:
    """TorchScript archives are zip files with a ``code/`` folder (state dicts saved by torch.save are not)."""
    path = Path(path)
    if not (path.is_file() and zipfile.is_zipfile(path)):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n or n.startswith("code/") for n in z.namelist())


def load_weights(model: nn.Module, weights: str | Path) -> nn.Module:
    path = Path(weights)
    if not path.is_file():
        raise ModelSourceError(f"weights file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickled objects other than tensors are refused here
            raise ModelSourceError(
                f"{path}: not a plain state dict ({e}). FIRE reads weights with weights_only=True and never "
                "unpickles arbitrary objects; save `model.state_dict()` or use safetensors"
            ) from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelSourceError(f"{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def _factory(spec: str):
    module_name, _, attr = spec.partition(":")
    if module_name in ("torchvision", "timm"):
        try:
            if module_name == "torchvision":
                import torchvision

                return lambda **kw: torchvision.models.get_model(attr, weights=None, **kw)
            import timm

            return lambda **kw: timm.create_model(attr, pretrained=False, **kw)
        except ImportError as e:
            raise ModelSourceError(f"{spec}: {module_name} is not installed ({e})") from None
    try:
        return getattr(_checked_import(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ModelSourceError(f"{spec}: cannot import {attr!r} from {module_name!r} ({e})") from None


def _checked_import(module_name: str):
    """``module_name`` imported once each of its files is checked (``cache.trusted_code``) before it runs:
    the package's ``__init__`` files one level at a time (finding ``a.b`` runs ``a``, checked the step
    before), then the module's own; and while it imports, every module it pulls in from outside the
    installed packages and the standard library (``_CodeCheck``). A module already imported is not run
    again, and so not checked."""
    parts = module_name.split(".")
    check = _CodeCheck()
    sys.meta_path.insert(0, check)  # before the chain: finding a.b runs a, and what a imports
    try:
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name in sys.modules:
                continue
            found = importlib.util.find_spec(name)
            if found is None:
                raise ImportError(f"no module named {name!r}")
            if found.has_location and found.origin:
                trusted_code(found.origin)
        return importlib.import_module(module_name)
    finally:
        sys.meta_path.remove(check)


class _CodeCheck(importlib.abc.MetaPathFinder):
    """A finder that finds nothing itself: it looks a module up as the path finder will and checks its
    file (``cache.trusted_code``) unless it lies in the installed packages or the standard library (whose
    owners installed this Python), then lets the usual finders load it."""

    installed = tuple(
        str(Path(p).resolve())
        for k, p in sysconfig.get_paths().items()
        if k in ("stdlib", "platstdlib", "purelib", "platlib")
    )

    def find_spec(self, name, path, target=None):
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.has_location and spec.origin:
            origin = str(Path(spec.origin).resolve())
            if not origin.startswith(tuple(p + "/" for p in self.installed)):
                trusted_code(spec.origin)
        return None


def load_torch_model(spec: str, weights: str | Path | None = None, num_classes: int | None = None) -> nn.Module:
    """An ``nn.Module`` (or TorchScript module) in eval mode from a file or ``module:factory`` spec."""
    if is_torchscript(spec):
        if weights:
            raise ModelSourceError(f"{spec} is TorchScript: it carries its weights, drop --weights")
        return torch.jit.load(trusted_code(spec), map_location="cpu").eval()
    if ":" not in spec:
        raise ModelSourceError(
            f"{spec!r}: expected a TorchScript file, package.module:factory, torchvision:NAME or timm:NAME"
        )
    kwargs = {"num_classes": num_classes} if num_classes else {}
    model = _factory(spec)(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelSourceError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    if weights:
        load_weights(model, weights)
    return model.eval()


def torchscript_to_onnx(model: torch.jit.ScriptModule, example: torch.Tensor, path: Path) -> Path:
    """A TorchScript module as an ONNX file with a dynamic batch axis (torch.fx cannot cut TorchScript;
    the ONNX graph can be cut)."""
    from modelio.export import onnx_export

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    onnx_export(model, example, path, INPUT, LOGITS)
    return path
