"""The protection pipeline: ``fire export``, ``calibrate``, ``verify``, ``build-repo``, ``build-engines``."""

from __future__ import annotations

import argparse
from pathlib import Path

from fire_cli.common import FOLDED_HELP, add_attack_args, add_command, add_data_args, attack_spec


def export(a: argparse.Namespace) -> None:
    from modelio.export import ExportError, export_onnx_model, export_split, export_torch_model
    from modelio.onnx_graph import OnnxModelError
    from modelio.preprocess import PreprocessError

    if a.onnx or a.torch:
        from fire_cli.protect import Source

        src = Source(a, Path(a.out))
        cut = a.cut or a.layer
        try:
            if src.module is not None:
                info = export_torch_model(src.module, cut, a.out, src.preprocess, layer2=a.layer2,
                                          source={"kind": "torch", "spec": a.torch})  # fmt: skip
            else:
                info = export_onnx_model(src.onnx, cut, a.out, src.preprocess)
        except (OnnxModelError, PreprocessError, ExportError) as e:
            raise SystemExit(str(e)) from None
    elif a.model:
        info = export_split(a.model, a.layer, a.out, layer2=a.layer2)
    else:
        raise SystemExit("fire export needs --model ZOO_DIR, --onnx FILE or --torch SPEC")
    parts = "head.onnx, mid.onnx, tail.onnx" if info.multilayer else "head.onnx, tail.onnx"
    print(
        f"wrote {a.out}/{parts}, split.json  (features {info.feature_shape}, "
        f"split error {info.split_max_abs_err:.2g}, ONNX error {info.onnx_max_abs_err:.2g})"
    )


def calibrate(a: argparse.Namespace) -> None:
    if a.auto:
        return _calibrate_auto(a)
    if not a.export:
        raise SystemExit("fire calibrate needs --export EXPORT_DIR (or --auto --model MODEL_DIR --out EXPORT_DIR)")
    import numpy as np

    from calibration import CalibrationConfig, calibrate, calibrate_second
    from fire_backend.names import DIRECTIONS_FILE
    from modelio.export import ExportInfo

    cfg = CalibrationConfig(
        estimator=a.estimator,
        mode=a.mode,
        alpha=a.alpha,
        n_poisoned=a.n_poisoned or 200,
        n_clean=a.n_clean,
        fpr=a.fpr,
        views=a.views,
        seed=a.seed,
        attack=attack_spec(a),
    )
    out = a.out or str(Path(a.export) / DIRECTIONS_FILE)
    data = None
    if a.clean:  # the user's images; otherwise the zoo dataset the model was trained on
        from fire_cli.common import calibration_set_from_args

        data = calibration_set_from_args(a, ExportInfo.read(a.export).preprocessing())
        cfg.attack = {}
    try:
        d = calibrate(a.export, out, cfg, data)
    except ValueError as e:
        raise SystemExit(f"fire calibrate: {e}") from None
    print(f"wrote {out}  (|beta| {float(np.linalg.norm(d.beta)):.4g}, gated threshold {d.threshold:.4g})")
    if ExportInfo.read(a.export).multilayer:  # the second layer, on what the first repair leaves
        out2 = a.out2 or str(Path(out).with_name(Path(out).stem + "2.safetensors"))
        d2 = calibrate_second(a.export, d, out2, cfg, data)
        print(f"wrote {out2}  ({d2.layer}: |beta| {float(np.linalg.norm(d2.beta)):.4g})")


def _calibrate_auto(a: argparse.Namespace) -> None:
    from calibration.auto import AutoConfig, auto_calibrate_model

    if not (a.model and a.out):
        raise SystemExit("fire calibrate --auto needs --model MODEL_DIR and --out EXPORT_DIR")
    cfg = AutoConfig(max_ca_drop=a.max_ca_drop, fpr=a.fpr, layers=tuple(a.layers or ()))
    spec = attack_spec(a) or None
    result, path = auto_calibrate_model(a.model, a.out, a.n_poisoned or 50, a.n_clean, cfg, spec, a.seed)
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
        f"and the split at {b.setting.layer} to {a.out}"
    )


def verify(a: argparse.Namespace) -> None:
    from fire_backend.directions import DirectionFile, DirectionFileError
    from fire_backend.names import SPLIT_JSON
    from modelio.export import ExportInfo
    from serving.control import deployed_expectations
    from serving.repository import repair_model_of

    target = Path(a.target)
    if (target / SPLIT_JSON).is_file():  # an export directory
        info = ExportInfo.read(target)
        shape, head_sha = tuple(info.feature_shape), info.head_sha256
    elif (target / "config.pbtxt").is_file():  # a protected model (or its repair model) in a repository
        try:
            repair = repair_model_of(target.parent, target.name)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        shape, head_sha = deployed_expectations(target.parent, repair)
    else:
        raise SystemExit(f"{target} is neither an export directory nor a model in a repository")
    try:
        d = DirectionFile.load(a.directions, feature_shape=shape, head_sha256=head_sha)
    except DirectionFileError as e:
        raise SystemExit(f"REJECTED: {e}") from None
    print(
        f"OK: {a.directions} fits {target} (layer {d.layer}, mode {d.mode}, {d.n_poisoned} poisoned samples, "
        f"created {d.created})"
    )


def build_repo(a: argparse.Namespace) -> None:
    from serving.configs import ServingSettings
    from serving.repository import ProtectedModel, build_repository

    models = []
    for name, exp, dirs in a.model:  # DIRECTIONS, or FIRST,SECOND for a two-layer export
        first, _, second = dirs.partition(",")
        second_file = Path(second) if second else None
        models.append(
            ProtectedModel(name, Path(exp), Path(first), directions2=second_file, plain=a.plain, folded=a.folded)
        )
    settings = ServingSettings(
        max_batch_size=a.max_batch_size, max_queue_delay_us=a.max_queue_delay_us, instances=a.instances
    )
    for b in build_repository(models, a.out, settings, tensorrt=a.tensorrt):
        print(f"{b.name}: {', '.join(b.models)}")


def build_engines(a: argparse.Namespace) -> None:
    from modelio.tensorrt import TensorRTUnavailableError
    from serving.repository import build_engines

    try:
        built = build_engines(a.repo, rebuild=a.rebuild)
    except TensorRTUnavailableError as e:
        raise SystemExit(f"fire build-engines: {e}") from None
    print(f"built {len(built)} TensorRT engine(s)" + "".join(f"\n  {p}" for p in built))


def register(sub) -> None:
    from fire_cli.common import add_preprocess_args
    from fire_cli.protect import add_source_args

    e = add_command(sub, "export", "split a model after a layer and export both halves to ONNX", export)
    e.add_argument("--model", help="a zoo model directory (from fire train); or --onnx / --torch")
    add_source_args(e, repo=False)
    add_preprocess_args(e)
    e.add_argument("--layer", default="layer2", help="sub-module to cut after (e.g. layer1, layer2, layer3)")
    e.add_argument("--cut", help="--onnx: the tensor to cut at (see `fire layers`); --torch: like --layer")
    e.add_argument("--layer2", help="multi-layer repair: a second, later cut (e.g. --layer layer1 --layer2 layer2)")
    e.add_argument("--out", required=True, help="export directory to write")

    c = add_command(sub, "calibrate", "estimate the backdoor direction and write the direction file", calibrate)
    c.add_argument("--export", help="export directory (from fire export)")
    c.add_argument(
        "--out", help="direction file (default: EXPORT/directions.safetensors); with --auto: the export directory"
    )
    c.add_argument("--out2", help="two-layer export: the second direction file (default: EXPORT/directions2...)")
    c.add_argument(
        "--auto",
        action="store_true",
        help="choose layer, mode, alpha and rank from held-out calibration samples, export the split there",
    )
    c.add_argument("--model", help="--auto: the model directory (from fire train)")
    c.add_argument("--max-ca-drop", type=float, default=0.5, help="--auto: allowed clean-accuracy drop, points")
    c.add_argument("--layers", nargs="+", help="--auto: candidate layers (default: every repairable one)")
    c.add_argument("--estimator", default="paired", choices=["paired", "unpaired"])
    c.add_argument("--mode", default="project", choices=["subtract", "project", "gated"])
    c.add_argument("--alpha", type=float, default=1.0)
    c.add_argument("--n-poisoned", type=int, help="triggered calibration samples (default 200; --auto: 50)")
    c.add_argument("--n-clean", type=int, default=1000)
    c.add_argument("--fpr", type=float, default=0.01, help="gated: clean false-positive rate of the gate")
    c.add_argument("--views", type=int, default=4, help="unpaired: augmented views per image")
    c.add_argument("--seed", type=int, default=0)
    add_attack_args(c, None)
    add_data_args(c, counts=False)

    v = add_command(sub, "verify", "check a direction file against an export before deploying it", verify)
    v.add_argument("directions")
    v.add_argument("target", help="export directory, or a model in a repository (e.g. model_repository/cifar10)")

    b = add_command(sub, "build-repo", "write the Triton model repository (CPU + GPU profiles)", build_repo)
    b.add_argument(
        "--model",
        nargs=3,
        action="append",
        required=True,
        metavar=("NAME", "EXPORT", "DIRECTIONS"),
        help="a protected model (repeatable: one server hosts many); DIRECTIONS is FIRST,SECOND for a two-layer export",
    )
    b.add_argument("--out", default="model_repository")
    b.add_argument("--max-batch-size", type=int, default=64)
    b.add_argument("--max-queue-delay-us", type=int, default=0)
    b.add_argument("--instances", type=int, default=1)
    b.add_argument("--tensorrt", action="store_true", help="also build the GPU profile's engines (needs a GPU)")
    b.add_argument("--plain", action="store_true", help="also serve NAME_plain, unprotected (comparisons only)")
    b.add_argument("--folded", action="store_true", help=FOLDED_HELP)

    be = add_command(sub, "build-engines", "build missing TensorRT engines of a repository on this GPU", build_engines)
    be.add_argument("--repo", default="model_repository")
    be.add_argument("--rebuild", action="store_true", help="rebuild engines that exist too")
