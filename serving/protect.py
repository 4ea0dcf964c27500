"""``fire protect``: a model you already have, protected and ready to serve, in one step.

    cut (given, or chosen from the calibration images) -> export head/tail -> calibrate -> repository

The model comes as an ONNX file, a torch module, or an entry of an existing Triton model repository;
in the last case the protected ensemble takes the entry's name and its exact input/output names, data
types, dims and max_batch_size, so clients written for the original keep working unchanged, and the
other models of that repository are copied alongside.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from torch import nn

from calibration.calibrate import CalibrationConfig, CalibrationSet, calibrate, observe_directions
from calibration.cutsearch import ALPHAS, CutScore, choose_cut, onnx_runner_for
from calibration.estimators import not_triggered
from calibration.inprocess import SplitRunner
from fire_backend.directions import DirectionFile
from fire_backend.errors import InvalidInputError
from fire_backend.names import DIRECTIONS_FILE, METRICS_ON, ModelNames
from modelio.export import ExportInfo, export_onnx_model, export_torch_model
from modelio.preprocess import Preprocess
from modelio.split import module_cuts
from serving.configs import ServingSettings, parse_config, write_config
from serving.entry import Entry, read_entry
from serving.repository import BuiltModel, ProtectedModel, build_repository, serve_on_cpu


@dataclass
class ProtectConfig:
    name: str  # the protected model's name on the server
    out: Path  # the model repository to write
    work_dir: Path  # where the export (halves, direction file) goes
    cut: str | None = None  # an ONNX tensor or a torch sub-module; None: choose from the calibration images
    max_ca_drop: float = 0.5  # choosing a cut: the most clean predictions (percent) a repair may change
    choose_alpha: bool = True  # choosing a cut: the strength too, among cutsearch.ALPHAS (else calibration.alpha)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    keep_original: bool = True  # a repository entry: also serve it, unprotected, as <name>_unprotected
    plain: bool = False  # also serve <name>_plain (head -> tail, unprotected): comparisons only
    folded: bool = False  # also serve <name>_folded (CPU: one stub, no hops, hot-swappable directions)
    whole: bool = False  # also serve <name>_whole (the unsplit model, unprotected): benchmarks only
    observe: bool = False  # no triggered images yet: an alpha-0 direction, traffic recorded for --from-traffic
    metrics: str = METRICS_ON  # FIRE's metrics: off, on, detailed (+ per-sample scores on the metrics port)
    settings: ServingSettings = field(default_factory=ServingSettings)


@dataclass
class ProtectResult:
    export: ExportInfo
    directions: DirectionFile
    built: BuiltModel
    cut_scores: list[CutScore]  # empty when the cut was given
    unservable: list[str] = field(default_factory=list)  # copied models the CPU profile's server cannot run, and why
    warnings: list[str] = field(default_factory=list)  # what the user should look at (``estimators.not_triggered``)
    skipped_cuts: dict[str, str] = field(default_factory=dict)  # valid cuts without a static shape -> why left out

    @property
    def chosen(self) -> CutScore | None:
        """The cut search's score of what was deployed (None when the cut was given)."""
        same = [s for s in self.cut_scores if s.cut == self.export.layer and s.alpha == self.directions.alpha]
        return same[0] if same else None


def _choose(runner_for, cuts: list[str], data: CalibrationSet, cfg: ProtectConfig) -> tuple[str, list[CutScore]]:
    """The cut (and, when chosen with it, the strength: written into ``cfg.calibration``)."""
    if cfg.cut:
        return cfg.cut, []
    if cfg.observe:  # nothing triggered to choose with: the middle of the network
        return cuts[len(cuts) // 2], []
    alphas = ALPHAS if cfg.choose_alpha else (cfg.calibration.alpha,)
    best, scores = choose_cut(runner_for, cuts, data, cfg.max_ca_drop, cfg.calibration.seed, alphas,
                              cfg.calibration.augment)  # fmt: skip
    cfg.calibration = replace(cfg.calibration, alpha=best.alpha, augment=best.augment)
    return best.cut, scores


def _evidence(runner, data: CalibrationSet, cfg: ProtectConfig) -> list[str]:
    """``estimators.not_triggered`` on the model's own predictions (any cut's runner: head -> tail is the
    model), as a warning; none in observe mode (nothing triggered yet)."""
    if cfg.observe or not len(data.triggered):
        return []
    why = not_triggered(runner.labels(runner.features(data.clean)), runner.labels(runner.features(data.triggered)))
    return [why] if why else []


def _finish(export_dir: Path, data: CalibrationSet, cfg: ProtectConfig, scores, io=None) -> ProtectResult:
    if cfg.observe:
        d = observe_directions(export_dir, export_dir / DIRECTIONS_FILE, data.clean)
    else:
        d = calibrate(export_dir, export_dir / DIRECTIONS_FILE, cfg.calibration, data)
    directions = export_dir / DIRECTIONS_FILE
    model = ProtectedModel(cfg.name, export_dir, directions, plain=cfg.plain, whole=cfg.whole, io=io,
                           folded=cfg.folded, record_traffic=cfg.observe, metrics=cfg.metrics)  # fmt: skip
    (built,) = build_repository([model], cfg.out, cfg.settings)
    return ProtectResult(ExportInfo.read(export_dir), d, built, scores)


def protect_onnx(onnx_path: str | Path, preprocess: Preprocess, data: CalibrationSet, cfg: ProtectConfig,
                 io=None) -> ProtectResult:  # fmt: skip
    runner_for, cuts, skipped = onnx_runner_for(onnx_path, preprocess)
    cut, scores = _choose(runner_for, cuts, data, cfg)
    export_dir = Path(cfg.work_dir) / cfg.name
    export_onnx_model(onnx_path, cut, export_dir, preprocess, check_images=data.clean[:64])
    result = _finish(export_dir, data, cfg, scores, io)
    result.skipped_cuts = skipped if not cfg.cut else {}
    result.warnings = _evidence(runner_for(cut), data, cfg)
    return result


def protect_torch(model: nn.Module, preprocess: Preprocess, data: CalibrationSet, cfg: ProtectConfig,
                  source: dict | None = None) -> ProtectResult:  # fmt: skip
    import torch

    example = torch.from_numpy(preprocess.apply(data.clean[:2]))
    cuts = [c.name for c in module_cuts(model, example)]
    cut, scores = _choose(lambda c: SplitRunner(model, c, preprocess=preprocess), cuts, data, cfg)
    export_dir = Path(cfg.work_dir) / cfg.name
    export_torch_model(model, cut, export_dir, preprocess, check_images=data.clean[:64], source=source)
    result = _finish(export_dir, data, cfg, scores)
    result.warnings = _evidence(SplitRunner(model, cut, preprocess=preprocess), data, cfg)
    return result


def protect_entry(entry: Entry, preprocess: Preprocess, data: CalibrationSet, cfg: ProtectConfig) -> ProtectResult:
    """Protect a repository entry in place of itself: ``cfg.out`` gets the protected ensemble under the
    entry's name (original I/O and max_batch_size), the original as ``<name>_unprotected`` if asked, and
    a copy of every other model of the entry's repository."""
    cfg.name = entry.name
    cfg.settings = ServingSettings(**{**cfg.settings.__dict__, "max_batch_size": entry.max_batch_size})
    out = Path(cfg.out)
    if out.resolve() == entry.directory.parent.resolve():
        raise InvalidInputError(
            f"--out must be a new repository, not {entry.directory.parent} (nothing is overwritten)"
        )
    result = protect_onnx(entry.onnx, preprocess, data, cfg, io=(entry.input, entry.output))
    for other in sorted(p for p in entry.directory.parent.iterdir() if p.is_dir() and p.name != entry.name):
        if (other / "config.pbtxt").is_file() and not (out / other.name).exists():
            shutil.copytree(other, out / other.name)
            result.unservable += [w for w in [serve_on_cpu(out / other.name)] if w]
    if cfg.keep_original:
        twin = ModelNames(entry.name).unprotected
        shutil.rmtree(out / twin, ignore_errors=True)
        shutil.copytree(entry.directory, out / twin)
        for config_file in [out / twin / "config.pbtxt", *(out / twin / "configs").glob("*.pbtxt")]:
            config = parse_config(config_file.read_text())
            config.name = twin
            profile = "cpu" if config_file.name == "config.pbtxt" else config_file.stem
            write_config(out / twin, config, profile)
        result.unservable += [w for w in [serve_on_cpu(out / twin)] if w]
        result.built.models.append(twin)
    return result


__all__ = ["ProtectConfig", "ProtectResult", "protect_entry", "protect_onnx", "protect_torch", "read_entry"]
