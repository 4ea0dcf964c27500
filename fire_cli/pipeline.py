"""The protection pipeline: ``fire export``, ``calibrate``, ``verify``, ``build-repo``, ``build-engines``."""

from __future__ import annotations

import argparse
from pathlib import Path

from calibration.calibrate import CalibrationConfig
from fire_backend.names import DIRECTIONS_FILE, METRICS_ON, REPOSITORY_DIR, SPLIT_JSON
from fire_cli.common import UsageError, add_attack_args, add_command, add_data_args, attack_spec
from fire_cli.options import add, add_fields, config_from, default_of
from serving.configs import ServingSettings

ZOO_CUT = "layer2"  # where a zoo model is cut unless told otherwise
CALIBRATION_FIELDS = {"estimator": "--estimator", "mode": "--mode", "alpha": "--alpha", "n_clean": "--n-clean",
                      "fpr": "--fpr", "views": "--views", "augment": "--augment", "seed": "--seed"}  # fmt: skip
SETTINGS_FIELDS = {"max_batch_size": "--max-batch-size", "max_queue_delay_us": "--max-queue-delay-us",
                   "instances": "--instances", "repair_instances": "--repair-instances"}  # fmt: skip


def export(a: argparse.Namespace) -> None:
    from modelio.export import export_onnx_model, export_split, export_torch_model

    if a.onnx or a.torch:
        from fire_cli.protect import Source

        if not a.cut:
            raise UsageError("an --onnx / --torch model needs --cut (see `fire layers`)")
        src = Source(a, Path(a.out))
        if src.module is not None:
            info = export_torch_model(src.module, a.cut, a.out, src.preprocess, layer2=a.cut2,
                                      source={"kind": "torch", "spec": a.torch})  # fmt: skip
        else:
            info = export_onnx_model(src.onnx, a.cut, a.out, src.preprocess)
    elif a.model_dir:
        info = export_split(a.model_dir, a.cut or ZOO_CUT, a.out, layer2=a.cut2, pixels=a.pixels)
    else:
        raise UsageError("fire export needs --model-dir ZOO_DIR, --onnx FILE or --torch SPEC")
    parts = "head.onnx, mid.onnx, tail.onnx" if info.multilayer else "head.onnx, tail.onnx"
    print(
        f"wrote {a.out}/{parts}, {SPLIT_JSON}  (features {info.feature_shape}, "
        f"split error {info.split_max_abs_err:.2g}, ONNX error {info.onnx_max_abs_err:.2g})"
    )


def calibrate(a: argparse.Namespace) -> None:
    if a.auto:
        return _calibrate_auto(a)
    if not a.export:
        raise UsageError("fire calibrate needs --export EXPORT_DIR (or --auto --model-dir ZOO_DIR --export DIR)")
    import numpy as np

    from calibration import calibrate, calibrate_second
    from modelio.export import ExportInfo

    info = ExportInfo.read(a.export)
    cfg = config_from(CalibrationConfig, a, CALIBRATION_FIELDS, n_poisoned=a.n_poisoned or 200, attack=attack_spec(a))
    out = a.out or str(Path(a.export) / DIRECTIONS_FILE)
    data = None
    if a.clean:  # the user's images; otherwise the zoo dataset the model was trained on
        from fire_cli.common import calibration_set_from_args

        data = calibration_set_from_args(a, info.preprocessing())
        cfg.attack = {}
    d = calibrate(a.export, out, cfg, data)
    print(f"wrote {out}  (|beta| {float(np.linalg.norm(d.beta)):.4g}, gated threshold {d.threshold:.4g})")
    if info.multilayer:  # the second layer, on what the first repair leaves
        out2 = a.out2 or str(Path(out).with_name(Path(out).stem + "2.safetensors"))
        d2 = calibrate_second(a.export, d, out2, cfg, data)
        print(f"wrote {out2}  ({d2.layer}: |beta| {float(np.linalg.norm(d2.beta)):.4g})")


def _calibrate_auto(a: argparse.Namespace) -> None:
    from calibration.auto import AutoConfig, auto_calibrate_model

    if not (a.model_dir and a.export):
        raise UsageError("fire calibrate --auto needs --model-dir ZOO_DIR and --export DIR (the export it writes)")
    cfg = AutoConfig(max_ca_drop=a.max_ca_drop, fpr=a.fpr, layers=tuple(a.cuts or ()))
    spec = attack_spec(a) or None
    result, path = auto_calibrate_model(a.model_dir, a.export, a.n_poisoned or 50, a.n_clean, cfg, spec, a.seed)
    print("top settings by held-out PA (all scores in auto_calibration.csv):")
    print("| layer | mode | alpha | rank | PA | ASR | CA drop | agreement |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for s in sorted(result.scores, key=lambda s: (-s.pa, s.ca_drop))[:8]:
        st = s.setting
        print(f"| {st.layer} | {st.mode} | {st.alpha} | {st.rank} | {s.pa:.1f} | {s.asr:.1f} | {s.ca_drop:.2f} | "
              f"{s.agreement:.1f} |")  # fmt: skip
    b = result.best
    verdict = "" if result.feasible else f" (NO setting kept the CA drop within {cfg.max_ca_drop}: least-harmful one)"
    print(
        f"chose layer {b.setting.layer}, mode {b.setting.mode}, alpha {b.setting.alpha}, rank {b.setting.rank}: "
        f"held-out PA {b.pa:.1f} %, ASR {b.asr:.1f} %, CA drop {b.ca_drop:.2f} points{verdict}\nwrote {path} "
        f"and the split at {b.setting.layer} to {a.export}"
    )


def verify(a: argparse.Namespace) -> None:
    from fire_backend.directions import DirectionFile
    from modelio.export import ExportInfo
    from serving.control import deployed_expectations
    from serving.repository import repair_model_of

    target = Path(a.target)
    if (target / SPLIT_JSON).is_file():  # an export directory
        info = ExportInfo.read(target)
        shape, head_sha = tuple(info.feature_shape), info.head_sha256
    elif (target / "config.pbtxt").is_file():  # a protected model (or its repair model) in a repository
        repair = repair_model_of(target.parent, target.name)
        shape, head_sha = deployed_expectations(target.parent, repair)
    else:
        raise UsageError(f"{target} is neither an export directory nor a model in a repository")
    d = DirectionFile.load(a.directions, feature_shape=shape, head_sha256=head_sha)
    print(
        f"OK: {a.directions} fits {target} (layer {d.layer}, mode {d.mode}, {d.n_poisoned} poisoned samples, "
        f"created {d.created})"
    )


def build_repo(a: argparse.Namespace) -> None:
    from serving.repository import ProtectedModel, build_repository

    models = []
    for name, exp, dirs in a.entry:  # DIRECTIONS, or FIRST,SECOND for a two-layer export
        first, _, second = dirs.partition(",")
        models.append(ProtectedModel(name, Path(exp), Path(first), directions2=Path(second) if second else None,
                                     plain=a.plain, folded=a.folded, metrics=a.metrics))  # fmt: skip
    settings = config_from(ServingSettings, a, SETTINGS_FIELDS)
    for b in build_repository(models, a.out, settings, tensorrt=a.tensorrt):
        print(f"{b.name}: {', '.join(b.models)}")


def build_engines(a: argparse.Namespace) -> None:
    from serving.repository import build_engines

    built = build_engines(a.repo, rebuild=a.rebuild)
    print(f"built {len(built)} TensorRT engine(s)" + "".join(f"\n  {p}" for p in built))


def register(sub) -> None:
    from fire_cli.common import add_preprocess_args
    from fire_cli.protect import add_source_args

    e = add_command(sub, "export", "split a model at a cut and export both halves to ONNX", export)
    add(e, "--model-dir", detail="or --onnx / --torch")
    add_source_args(e, repo=False)
    add_preprocess_args(e)
    add(e, "--cut", detail=f"default for a zoo model: {ZOO_CUT}")
    add(e, "--cut2")
    add(e, "--pixels", default="float", detail="--model-dir only")
    add(e, "--out", required=True, detail="the export directory")

    c = add_command(sub, "calibrate", "estimate the backdoor direction and write the direction file", calibrate)
    add(c, "--export", detail="with --auto: the one it writes")
    add(c, "--out", detail="the direction file (default: EXPORT/directions.safetensors)")
    add(c, "--out2", detail="default: beside --out, ending in 2")
    add(c, "--auto", detail="cut, mode, alpha and rank; the export is written at the chosen cut")
    add(c, "--model-dir", detail="--auto: the model to export and calibrate")
    add(c, "--max-ca-drop", default=default_of(_auto_config(), "max_ca_drop"), detail="--auto")
    add(c, "--cuts", detail="--auto")
    add_fields(c, CalibrationConfig, CALIBRATION_FIELDS)
    add(c, "--n-poisoned", detail="default 200; --auto: 50")
    add_attack_args(c)
    add_data_args(c, counts=False)

    v = add_command(sub, "verify", "check a direction file against an export before deploying it", verify)
    v.add_argument("directions", help="the direction file")
    v.add_argument("target", help="an export directory, or a model in a repository (e.g. model_repository/cifar10)")

    b = add_command(sub, "build-repo", "write the Triton model repository (CPU + GPU profiles)", build_repo)
    add(b, "--entry", required=True)
    add(b, "--out", default=REPOSITORY_DIR, detail="the model repository")
    add_fields(b, ServingSettings, SETTINGS_FIELDS)
    add(b, "--tensorrt")
    add(b, "--plain")
    add(b, "--folded")
    add(b, "--metrics", default=METRICS_ON)

    be = add_command(sub, "build-engines", "build missing TensorRT engines of a repository on this GPU", build_engines)
    add(be, "--repo", default=REPOSITORY_DIR)
    add(be, "--rebuild")


def _auto_config():
    from calibration.auto import AutoConfig

    return AutoConfig
