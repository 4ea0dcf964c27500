"""Bring your own model: ``fire layers`` (where it can be cut) and ``fire protect`` (protect it, ready to serve)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fire_cli.common import (
    FOLDED_HELP,
    add_attack_args,
    add_command,
    add_data_args,
    add_preprocess_args,
    calibration_set_from_args,
    preprocess_from_args,
)


def add_source_args(p: argparse.ArgumentParser, repo: bool = True) -> None:
    g = p.add_argument_group("the model", "one of: an ONNX file, a PyTorch model, an entry of a Triton repository")
    g.add_argument("--onnx", help="an ONNX file")
    g.add_argument(
        "--torch", metavar="SPEC", help="TorchScript file, package.module:factory, torchvision:NAME or timm:NAME"
    )
    g.add_argument("--weights", help="--torch factories: .safetensors, or a state dict (read with weights_only)")
    g.add_argument("--num-classes", type=int, help="--torch factories: passed to the constructor")
    if repo:
        g.add_argument("--repo", help="a Triton model repository holding the model (with --model)")
        g.add_argument("--model", help="the model's name in --repo")


class Source:
    """The model the arguments name: an ONNX file (possibly converted from TorchScript), a torch module,
    or a Triton repository entry."""

    def __init__(self, a: argparse.Namespace, work_dir: Path):
        from modelio.onnx_graph import OnnxGraph, OnnxModelError
        from modelio.sources import ModelSourceError, is_torchscript, load_torch_model

        chosen = [x for x in (a.onnx, a.torch, getattr(a, "repo", None)) if x]
        if len(chosen) != 1:
            raise SystemExit("name the model with exactly one of --onnx FILE, --torch SPEC, --repo DIR --model NAME")
        self.entry, self.module, self.onnx = None, None, None
        try:
            if getattr(a, "repo", None):
                from serving.entry import EntryError, read_entry

                if not a.model:
                    raise SystemExit("--repo needs --model NAME")
                try:
                    self.entry = read_entry(a.repo, a.model)
                except EntryError as e:
                    raise SystemExit(str(e)) from None
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
            else:
                self.dims, self.dtype = (None, 3, None, None), "float32"
        except (OnnxModelError, ModelSourceError) as e:
            raise SystemExit(str(e)) from None
        self.preprocess = preprocess_from_args(a, self.dims, self.dtype)

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
    print(f"{len(rows)} valid single-tensor cuts, in the order the model runs; first column: the {kind}")
    for name, shape, label in rows:
        print(f"{name}\t{tuple(shape)}\t{label}")


def protect(a: argparse.Namespace) -> None:
    from calibration.calibrate import CalibrationConfig
    from serving.configs import ServingSettings
    from serving.protect import ProtectConfig, protect_entry, protect_onnx, protect_torch

    work = Path(a.work_dir)
    src = Source(a, work)
    data = calibration_set_from_args(a, src.preprocess, clean_only=a.observe)
    name = a.name or (src.entry.name if src.entry else Path(a.onnx or a.torch.partition(":")[0]).stem)
    cfg = ProtectConfig(
        name=name,
        out=Path(a.out),
        work_dir=work,
        cut=a.cut,
        max_ca_drop=a.max_ca_drop,
        calibration=CalibrationConfig(mode=a.mode, n_clean=a.n_clean, n_poisoned=a.n_poisoned, seed=a.seed),
        keep_original=not a.drop_original,
        plain=a.plain,
        folded=a.folded,
        observe=a.observe,
        settings=ServingSettings(max_batch_size=a.max_batch_size),
    )
    if src.entry is not None:
        r = protect_entry(src.entry, src.preprocess, data, cfg)
    elif src.module is not None:
        r = protect_torch(src.module, src.preprocess, data, cfg, source={"kind": "torch", "spec": a.torch})
    else:
        r = protect_onnx(src.onnx, src.preprocess, data, cfg)
    if r.cut_scores:
        kinds = r.cut_scores[0]
        print(f"cuts tried ({kinds.gain_kind} / {kinds.cost_kind}, held-out calibration images, %):")
        for s in r.cut_scores:
            mark = "  <- chosen" if s.cut == r.export.layer else ""
            print(f"  {s.cut}\t{s.feature_shape}\t{s.gain:.1f} / {s.cost:.2f}{mark}")
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
    ly.add_argument("path", nargs="?", help="an ONNX file (or use --onnx / --torch / --repo --model)")
    add_source_args(ly)
    add_preprocess_args(ly)
    ly.add_argument("--work-dir", default="build/layers", help="TorchScript models: where their ONNX graph is written")
    ly.set_defaults(func=lambda a: layers(_positional_onnx(a)))

    p = add_command(sub, "protect", "protect your own classifier: cut, calibrate, write a Triton repository", protect)
    add_source_args(p)
    add_preprocess_args(p)
    add_data_args(p)
    add_attack_args(p, None)
    p.add_argument("--cut", help="where to cut (see `fire layers`); default: chosen from the calibration images")
    p.add_argument("--max-ca-drop", type=float, default=0.5, help="choosing the cut: clean predictions changed, %%")
    p.add_argument("--mode", default="project", choices=["subtract", "project", "gated"])
    p.add_argument("--name", help="the protected model's name (default: the file's stem, or the entry's name)")
    p.add_argument("--out", default="model_repository", help="the model repository to write")
    p.add_argument("--work-dir", default="build/protect", help="where the halves and the direction file go")
    p.add_argument("--max-batch-size", type=int, default=64, help="(an entry keeps its own)")
    p.add_argument("--drop-original", action="store_true", help="--repo: leave out the original (NAME_unprotected)")
    p.add_argument("--plain", action="store_true", help="also serve NAME_plain (head -> tail, unprotected)")
    p.add_argument("--folded", action="store_true", help=FOLDED_HELP)
    p.add_argument(
        "--observe",
        action="store_true",
        help="no triggered images yet: serve with a direction that changes nothing and record the traffic, "
        "then find the direction there with `fire update --from-traffic`",
    )
    p.add_argument("--seed", type=int, default=0)


def _positional_onnx(a: argparse.Namespace) -> argparse.Namespace:
    if a.path:
        if a.onnx or a.torch or a.repo:
            raise SystemExit("give the model once: a path, or --onnx / --torch / --repo")
        a.onnx = a.path
    return a
