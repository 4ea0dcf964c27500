"""Bring your own model: ``fire layers`` (where it can be cut) and ``fire protect`` (protect it, ready to serve)."""

from __future__ import annotations

import argparse
from pathlib import Path

from calibration.calibrate import CalibrationConfig
from calibration.cutsearch import ALPHAS
from fire_backend.names import REPOSITORY_DIR
from fire_cli.common import (
    UsageError,
    add_attack_args,
    add_command,
    add_data_args,
    add_preprocess_args,
    calibration_set_from_args,
    preprocess_from_args,
)
from fire_cli.options import add, add_fields, config_from, default_of
from serving.configs import ServingSettings
from serving.protect import ProtectConfig


def add_source_args(p: argparse.ArgumentParser, repo: bool = True) -> None:
    g = p.add_argument_group("the model", "one of: an ONNX file, a PyTorch model, an entry of a Triton repository")
    for flag in ("--onnx", "--torch", "--weights", "--num-classes"):
        add(g, flag)
    if repo:
        add(g, "--source-repo")
        add(g, "--source-model")


class Source:
    """The model the arguments name: an ONNX file (possibly converted from TorchScript), a torch module,
    or a Triton repository entry."""

    def __init__(self, a: argparse.Namespace, work_dir: Path):
        from modelio.onnx_graph import OnnxGraph
        from modelio.sources import is_torchscript, load_torch_model

        chosen = [x for x in (a.onnx, a.torch, getattr(a, "source_repo", None)) if x]
        if len(chosen) != 1:
            raise UsageError("name the model with exactly one of --onnx FILE, --torch SPEC, "
                             "--source-repo DIR --source-model NAME")  # fmt: skip
        self.entry, self.module, self.onnx = None, None, None
        if getattr(a, "source_repo", None):
            from serving.entry import read_entry

            if not a.source_model:
                raise UsageError("--source-repo needs --source-model NAME")
            self.entry = read_entry(a.source_repo, a.source_model)
            self.onnx = self.entry.onnx
        elif a.onnx:
            self.onnx = Path(a.onnx)
        else:
            model = load_torch_model(a.torch, a.weights, a.num_classes)
            if is_torchscript(a.torch):  # fx cannot cut TorchScript: go through its ONNX graph
                self.onnx = self._torchscript_onnx(a, model, work_dir)
            else:
                self.module = model
        if self.onnx is not None:
            self.graph = OnnxGraph(self.onnx)
            self.dims, self.dtype = self.graph.input.dims, self.graph.input.dtype
            if self.entry is not None and min(self.entry.input.dims) > 0:  # the config declares the served size
                self.dims = (self.dims[0], *self.entry.input.dims)
        else:
            self.dims, self.dtype = (None, 3, None, None), "float32"
        self.preprocess = preprocess_from_args(a, self.dims, self.dtype)
        if self.onnx is not None and tuple(self.graph.input.dims[1:]) != tuple(self.preprocess.dims):
            self.graph = OnnxGraph(self.onnx, input_dims=(None, *self.preprocess.dims))  # shapes at the served size

    @staticmethod
    def _torchscript_onnx(a: argparse.Namespace, model, work_dir: Path) -> Path:
        import torch

        from modelio.sources import torchscript_to_onnx

        pre = preprocess_from_args(a, (None, 3, None, None), "float32")
        work_dir.mkdir(parents=True, exist_ok=True)
        example = torch.zeros(2, *pre.dims, dtype=getattr(torch, pre.dtype))
        return torchscript_to_onnx(model, example, work_dir / "torchscript.onnx")


def layers(a: argparse.Namespace) -> None:
    import torch

    from modelio.split import module_cuts

    src = Source(a, Path(a.work_dir))
    if src.module is not None:
        example = torch.zeros(2, *src.preprocess.dims)
        rows = [(c.name, c.shape, c.label) for c in module_cuts(src.module, example)]
        kind = "sub-module (pass it as --cut)"
    else:
        rows = [(c.tensor, c.dims, c.label) for c in src.graph.cuts()]
        kind = "tensor (pass it as --cut)"
    print(f"{len(rows)} valid single-tensor cuts at input {tuple(src.preprocess.dims)}, in the order the model "
          f"runs; first column: the {kind}")  # fmt: skip
    for name, shape, label in rows:
        print(f"{name}\t{tuple(shape)}\t{label}")
    skipped = src.graph.skipped if src.module is None else {}
    if skipped:
        listed = "; ".join(f"{t} ({r})" for t, r in list(skipped.items())[:5])
        print(f"{len(skipped)} more without a static shape, left out: {listed}")


# ProtectConfig fields set from flags of the same meaning (defaults read from the dataclass)
PROTECT_FIELDS = {"cut": "--cut", "max_ca_drop": "--max-ca-drop", "plain": "--plain", "folded": "--folded",
                  "observe": "--observe", "metrics": "--metrics"}  # fmt: skip


def protect(a: argparse.Namespace) -> None:
    from calibration.calibrate import CalibrationConfig
    from calibration.cutsearch import shortfall
    from serving.configs import ServingSettings
    from serving.protect import ProtectConfig, protect_entry, protect_onnx, protect_torch

    work = Path(a.work_dir)
    src = Source(a, work)
    data = calibration_set_from_args(a, src.preprocess, clean_only=a.observe)
    name = a.model or (src.entry.name if src.entry else Path(a.onnx or a.torch.partition(":")[0]).stem)
    alpha = default_of(CalibrationConfig, "alpha") if a.alpha is None else a.alpha
    calibration = CalibrationConfig(mode=a.mode, alpha=alpha, n_clean=a.n_clean, n_poisoned=a.n_poisoned,
                                    seed=a.seed, augment=a.augment)  # fmt: skip
    settings = ServingSettings(max_batch_size=a.max_batch_size)
    cfg = config_from(ProtectConfig, a, PROTECT_FIELDS, name=name, out=Path(a.out), work_dir=work,
                      calibration=calibration, keep_original=not a.drop_original, settings=settings,
                      choose_alpha=a.alpha is None)  # fmt: skip
    if src.entry is not None:
        r = protect_entry(src.entry, src.preprocess, data, cfg)
    elif src.module is not None:
        r = protect_torch(src.module, src.preprocess, data, cfg, source={"kind": "torch", "spec": a.torch})
    else:
        r = protect_onnx(src.onnx, src.preprocess, data, cfg)
    if r.cut_scores:
        kinds, chosen = r.cut_scores[0], r.chosen
        print(f"cuts tried ({kinds.gain_kind} / transfer / {kinds.cost_kind}, held-out calibration images, %):")
        for s in r.cut_scores:
            mark = "  <- chosen" if s is chosen else ""
            scores = f"{s.gain:.1f} / {s.transfer:.1f} / {s.cost:.2f}"
            print(f"  {s.cut}\t{s.feature_shape}\talpha {s.alpha:g}\t{scores}{mark}")
        warning = shortfall(chosen, r.cut_scores, cfg.max_ca_drop) if chosen else None
        if warning:
            print(f"warning: {warning}")
    for warning in r.warnings:
        print(f"warning: {warning}")
    if r.skipped_cuts:
        t, why = next(iter(r.skipped_cuts.items()))
        print(f"{len(r.skipped_cuts)} valid cut(s) left out, no static shape at the served size (first: {t}, {why})")
    for reason in r.unservable:
        print(f"note: copied, but not servable by the CPU profile's server: {reason}")
    d = r.directions
    if a.observe:
        print(f"protected {cfg.name} in observe mode (cut at {r.export.layer}): the repair changes nothing yet; "
              "the tail records traffic for `fire update --from-traffic`")  # fmt: skip
        print(f"wrote {cfg.out}: {', '.join(r.built.models)}")
        return
    print(
        f"protected {cfg.name}: cut at {r.export.layer} (features {tuple(r.export.feature_shape)}), head -> tail "
        f"error {r.export.split_max_abs_err:.2g}; {d.estimator} direction from {d.n_poisoned} triggered and "
        f"{d.n_clean} clean images, mode {d.mode}\nwrote {cfg.out}: {', '.join(r.built.models)}\n"
        f"serve it with: fire serve --repo {cfg.out}"
    )


def register(sub) -> None:
    ly = add_command(sub, "layers", "list where a model can be cut (single-tensor cuts, with shapes)", layers)
    ly.add_argument("path", nargs="?", help="an ONNX file (or use --onnx / --torch / --source-repo)")
    add_source_args(ly)
    add_preprocess_args(ly)
    add(ly, "--work-dir", default="build/layers", detail="TorchScript models: their ONNX graph")
    ly.set_defaults(func=layers_command)

    p = add_command(sub, "protect", "protect your own classifier: cut, calibrate, write a Triton repository", protect)
    add_source_args(p)
    add_preprocess_args(p)
    add_data_args(p)
    add_attack_args(p)
    add_fields(p, ProtectConfig, PROTECT_FIELDS, {"cut": "default: chosen from the calibration images"})
    add(p, "--mode", default=default_of(CalibrationConfig, "mode"))
    add(p, "--augment", default=default_of(CalibrationConfig, "augment"))
    add(p, "--alpha", detail=f"default: chosen with the cut among {', '.join(map(str, ALPHAS))}; "
        f"{default_of(CalibrationConfig, 'alpha')} with --cut")  # fmt: skip
    add(p, "--model", detail="the protected model's name (default: the file's stem, or the entry's name)")
    add(p, "--out", default=REPOSITORY_DIR, detail="the model repository")
    add(p, "--work-dir", default="build/protect", detail="the halves and the direction file")
    add(p, "--max-batch-size", default=default_of(ServingSettings, "max_batch_size"),
        detail="a --source-repo entry keeps its own")  # fmt: skip
    add(p, "--drop-original")
    add(p, "--seed", default=0)


def layers_command(a: argparse.Namespace) -> None:
    _positional_onnx(a)
    layers(a)


def _positional_onnx(a: argparse.Namespace) -> None:
    """``fire layers model.onnx`` is ``fire layers --onnx model.onnx``."""
    if a.path:
        if a.onnx or a.torch or a.source_repo:
            raise UsageError("give the model once: a path, or --onnx / --torch / --source-repo")
        a.onnx = a.path
