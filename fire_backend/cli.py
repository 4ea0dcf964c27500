"""The ``fire`` command: one subcommand per step, each a thin wrapper over a Python function."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


def _parse_kv(items: Sequence[str]) -> dict:
    """``key=value`` pairs; values are read as JSON where they parse (numbers, lists), else strings."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _attack_spec(a: argparse.Namespace, default: str | None = None) -> dict:
    """The attack chosen on the command line: ``--attack-config FILE`` (JSON, e.g. ``{"name": "custom",
    "pattern": "trigger.png", "alpha": 0.5}``), then ``--attack NAME``, then ``--attack-param`` overrides."""
    spec: dict = {}
    if a.attack_config:
        spec = json.loads(Path(a.attack_config).read_text())
        if not isinstance(spec, dict) or "name" not in spec:
            raise SystemExit(f"{a.attack_config}: expected a JSON object with a 'name' field")
    if a.attack:
        spec["name"] = a.attack
    if not spec and default:
        spec = {"name": default}
    if not spec:
        return {}
    return {**spec, **_parse_kv(a.attack_param)}


def cmd_train(a: argparse.Namespace) -> None:
    from fire_backend.train import TrainConfig, train

    cfg = TrainConfig(
        dataset=a.dataset,
        arch=a.arch,
        widths=tuple(a.widths),
        blocks=a.blocks,
        attack=_attack_spec(a, "badnets")["name"],
        attack_params={k: v for k, v in _attack_spec(a, "badnets").items() if k != "name"},
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


def cmd_rescore(a: argparse.Namespace) -> None:
    from fire_backend.train import rescore

    m = rescore(a.model)
    print(f"{a.model}: CA {100 * m['CA']:.2f}%  ASR {100 * m['ASR']:.2f}%  PA {100 * m['PA']:.2f}%")


def cmd_export(a: argparse.Namespace) -> None:
    from fire_backend.export import export_split

    info = export_split(a.model, a.layer, a.out, layer2=a.layer2)
    parts = "head.onnx, mid.onnx, tail.onnx" if info.multilayer else "head.onnx, tail.onnx"
    print(
        f"wrote {a.out}/{parts}, split.json  (features {info.feature_shape}, "
        f"split error {info.split_max_abs_err:.2g}, ONNX error {info.onnx_max_abs_err:.2g})"
    )


def cmd_calibrate(a: argparse.Namespace) -> None:
    from calibration import CalibrationConfig, calibrate

    if a.auto:
        return _calibrate_auto(a)
    if not a.export:
        raise SystemExit("fire calibrate needs --export EXPORT_DIR (or --auto --model MODEL_DIR --out EXPORT_DIR)")

    attack = _attack_spec(a)
    cfg = CalibrationConfig(
        estimator=a.estimator,
        mode=a.mode,
        alpha=a.alpha,
        n_poisoned=a.n_poisoned or 200,
        n_clean=a.n_clean,
        fpr=a.fpr,
        views=a.views,
        seed=a.seed,
        attack=attack,
    )
    out = a.out or str(Path(a.export) / "directions.safetensors")
    d = calibrate(a.export, out, cfg)
    print(f"wrote {out}  (|beta| {float(d.beta.norm()):.4g}, gated threshold {d.threshold:.4g})")
    from fire_backend.export import ExportInfo

    if ExportInfo.read(a.export).multilayer:  # the second layer, on what the first repair leaves
        from calibration import calibrate_second

        out2 = a.out2 or str(Path(out).with_name(Path(out).stem + "2.safetensors"))
        d2 = calibrate_second(a.export, d, out2, cfg)
        print(f"wrote {out2}  ({d2.layer}: |beta| {float(d2.beta.norm()):.4g})")


def _calibrate_auto(a: argparse.Namespace) -> None:
    from calibration.auto import AutoConfig, auto_calibrate_model

    if not (a.model and a.out):
        raise SystemExit("fire calibrate --auto needs --model MODEL_DIR and --out EXPORT_DIR")
    cfg = AutoConfig(max_ca_drop=a.max_ca_drop, fpr=a.fpr, layers=tuple(a.layers or ()))
    result, path = auto_calibrate_model(
        a.model, a.out, a.n_poisoned or 50, a.n_clean, cfg, _attack_spec(a) or None, a.seed
    )
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


def _stream(a: argparse.Namespace):
    from calibration.streaming import DirectionStream

    repair = a.model if a.model.endswith("_fire") else f"{a.model}_fire"
    return DirectionStream(a.url, _admin_key(), a.repo, repair)


def cmd_update(a: argparse.Namespace) -> None:
    from calibration.streaming import GuardRails, head_features, read_images

    stream = _stream(a)
    head = f"{stream.repair_model.removesuffix('_fire')}_head"
    poisoned = head_features(a.url, head, read_images(a.poisoned), "http")
    clean = head_features(a.url, head, read_images(a.clean), "http") if a.clean else None
    r = stream.update(poisoned, clean, GuardRails(min_samples=a.min_samples, max_step=a.max_step))
    if r.status == "pending":
        print(f"pending: {r.reported_poisoned} of {a.min_samples} triggered reports; version {r.version} keeps serving")
    else:
        clip = f" (clipped from {r.proposed_step:.3f})" if r.clipped else ""
        print(
            f"updated {stream.repair_model} to version {r.version}: beta moved {r.step:.3f} x |beta|{clip}, "
            f"cosine to the old direction {r.cosine:.4f}; {r.reported_poisoned} triggered reports so far"
        )


def cmd_rollback(a: argparse.Namespace) -> None:
    stream = _stream(a)
    d = stream.rollback(a.to)
    print(f"{stream.repair_model} now serves direction version {d.version} (created {d.created})")


def cmd_build_engines(a: argparse.Namespace) -> None:
    from fire_backend.export import TensorRTUnavailableError
    from fire_backend.repository import build_engines

    try:
        built = build_engines(a.repo, rebuild=a.rebuild)
    except TensorRTUnavailableError as e:
        raise SystemExit(f"fire build-engines: {e}") from None
    print(f"built {len(built)} TensorRT engine(s)" + "".join(f"\n  {p}" for p in built))


def cmd_verify(a: argparse.Namespace) -> None:
    from fire_backend.control import deployed_expectations
    from fire_backend.directions import DirectionFile, DirectionFileError
    from fire_backend.export import ExportInfo

    target = Path(a.target)
    if (target / "split.json").is_file():  # an export directory
        info = ExportInfo.read(target)
        shape, head_sha = tuple(info.feature_shape), info.head_sha256
    elif (target / "config.pbtxt").is_file():  # a protected model (or its repair model) in a repository
        repair = target.name if "_fire" in target.name else f"{target.name}_fire"
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


def cmd_build_repo(a: argparse.Namespace) -> None:
    from fire_backend.repository import ProtectedModel, ServingSettings, build_repository

    models = []
    for name, exp, dirs in a.model:  # DIRECTIONS, or FIRST,SECOND for a two-layer export
        first, _, second = dirs.partition(",")
        models.append(ProtectedModel(name, Path(exp), Path(first), directions2=Path(second) if second else None))
    settings = ServingSettings(
        max_batch_size=a.max_batch_size, max_queue_delay_us=a.max_queue_delay_us, instances=a.instances
    )
    for b in build_repository(models, a.out, settings, tensorrt=a.tensorrt):
        print(f"{b.name}: {', '.join(b.models)}")


def _admin_key_file() -> Path:
    from fire_backend.data import cache_dir

    return cache_dir() / "admin_key"


def _admin_key() -> str:
    """$FIRE_ADMIN_KEY, else the key `fire serve` generated last."""
    import os

    key = os.environ.get("FIRE_ADMIN_KEY")
    if key:
        return key
    path = _admin_key_file()
    if not path.is_file():
        raise SystemExit(f"no admin key: set FIRE_ADMIN_KEY or start `fire serve` (it writes {path})")
    return path.read_text().strip()


def cmd_serve(a: argparse.Namespace) -> None:
    import os
    import signal
    import time

    from fire_backend.server import ServerConfig, TritonServer

    explicit = a.model_control == "explicit"
    cfg = ServerConfig(
        Path(a.repo),
        host=a.host,
        http_port=a.http_port,
        grpc_port=a.grpc_port,
        metrics_port=a.metrics_port,
        model_config_name=None if a.profile == "cpu" else a.profile,
        model_control=a.model_control,
        load_models=["*"] if explicit else [],
        watchdog=explicit,
        admin_key=os.environ.get("FIRE_ADMIN_KEY"),
        tls_cert=Path(a.tls_cert) if a.tls_cert else None,
        tls_key=Path(a.tls_key) if a.tls_key else None,
    )
    # SIGTERM (kill, systemd, CI) unwinds like Ctrl-C, so the server and its stubs are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with TritonServer(cfg) as server:
        if cfg.admin_key is None:
            key_file = _admin_key_file()
            key_file.touch(mode=0o600)
            key_file.chmod(0o600)
            key_file.write_text(server.admin_key + "\n")
            where = f"generated, in {key_file}"
        else:
            where = "from $FIRE_ADMIN_KEY"
        print(
            f"serving {a.repo}: HTTP {server.http_url}  gRPC {server.grpc_url}{' (TLS)' if cfg.tls_cert else ''}  "
            f"metrics {cfg.host}:{cfg.metrics_port}  (log: {server.log_path}); admin key {where}; Ctrl-C stops",
            flush=True,
        )
        try:
            while server.process.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("stopping", flush=True)
        if server.process.poll() is not None:
            raise SystemExit(f"tritonserver exited with code {server.process.returncode}:\n{server.log_tail()}")


def cmd_reload(a: argparse.Namespace) -> None:
    from fire_backend.control import reload_directions

    repair = a.model if a.model.endswith("_fire") or "_fire_" in a.model else f"{a.model}_fire"
    d = reload_directions(a.url, _admin_key(), Path(a.repo), repair, Path(a.directions))
    print(f"{repair} now serves {a.directions} (mode {d.mode}, created {d.created})")


def cmd_eval(a: argparse.Namespace) -> None:
    from clients import evaluate_served
    from fire_backend.attacks import attack_from_spec
    from fire_backend.metrics import format_table

    attack = attack_from_spec(_attack_spec(a, "badnets"))
    print(format_table(evaluate_served(a.url, a.models, a.dataset, attack, a.protocol, limit=a.limit)))


def cmd_classify(a: argparse.Namespace) -> None:
    from clients import FireClient, load_images
    from fire_backend.data import CIFAR10_CLASSES

    labels = FireClient(a.url, a.protocol).classify(a.model, load_images(a.images))
    for path, label in zip(a.images, labels, strict=True):
        name = f" ({CIFAR10_CLASSES[label]})" if a.cifar10_names else ""
        print(f"{path}\t{label}{name}")


def cmd_demo(a: argparse.Namespace) -> None:
    from calibration import CalibrationConfig
    from fire_backend.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        model_dir=Path(a.model),
        name=a.name,
        layer=a.layer,
        protocol=a.protocol,
        limit=a.limit,
        calibration=CalibrationConfig(mode=a.mode, n_poisoned=a.n_poisoned),
        results=Path(a.results) if a.results else None,
    )
    print(run_demo(cfg))


def cmd_bench(a: argparse.Namespace) -> None:
    if a.which == "efficacy":
        from benchmarks.efficacy import EfficacyConfig, run_efficacy

        cfg = EfficacyConfig(n_poisoned=a.n_poisoned, test_limit=a.limit, ablations=not a.no_ablations)
        if a.models:
            cfg.models = tuple(a.models)
        if a.out:
            cfg.out = a.out
        if a.quick:  # a smoke run: one model, 1000 test images, a small auto grid
            cfg.models, cfg.test_limit, cfg.curve = cfg.models[:1], a.limit or 1000, (1, 10, 50)
            cfg.auto.alphas, cfg.auto.ranks = (1.0,), (1, 2)
        for path in run_efficacy(cfg):
            print(path)
        return
    if a.which == "multimodel":
        from benchmarks.multimodel import MultiModelConfig, run_multimodel

        cfg = MultiModelConfig()
        if a.out:
            cfg.out = str(Path(a.out) / "multimodel.md")
        r = run_multimodel(cfg)
        print(Path(cfg.out).read_text())
        if not r.passed:
            raise SystemExit(1)
        return
    if a.which == "adaptive":
        from benchmarks.adaptive import run

        print(run())
        return
    from benchmarks.serving import ServingBenchConfig, main

    cfg = ServingBenchConfig(protocol=a.protocol, profile=a.profile)
    if a.quick:  # a smoke run: every code path, numbers not meant to be reported
        cfg.batch_sizes, cfg.concurrency, cfg.window_s, cfg.rounds, cfg.warmup_s = (1, 8), (1, 2), 0.5, 1, 0.2
        cfg.name = "serving-quick"
    if a.out:
        cfg.out_dir = Path(a.out)
    main(cfg)


def cmd_loadtest(a: argparse.Namespace) -> None:
    from loadtest.runner import LoadTestConfig, run_loadtest

    cfg = LoadTestConfig(
        models=a.models,
        protocol=a.protocol,
        url=a.url,
        repository=Path(a.repo),
        users=a.users,
        spawn_rate=a.spawn_rate or a.users,
        run_time_s=a.run_time,
        batch_size=a.batch_size,
        triggered_ratio=a.triggered_ratio,
        dataset=a.dataset,
        attack=a.attack,
        out_dir=Path(a.out),
        allow_remote=a.allow_remote,
    )
    print(run_loadtest(cfg).read_text())


def cmd_soak(a: argparse.Namespace) -> None:
    from loadtest.soak import SoakConfig, run_soak

    cfg = SoakConfig(
        repository=Path(a.repo),
        model=a.model,
        duration_s=a.minutes * 60,
        warmup_s=min(60.0, a.minutes * 60 / 5),
        rate_per_s=a.rate,
        batch_size=a.batch_size,
        out=Path(a.out),
        command="fire " + " ".join(sys.argv[1:]),
    )
    r = run_soak(cfg)
    print(cfg.out.read_text())
    if not r.passed:
        raise SystemExit(1)


def _add_attack_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument(
        "--attack",
        default=default,
        help="attack name: badnets, blended, wanet, sig, trojan, badnets_all2all, custom",
    )
    p.add_argument("--attack-config", help="JSON file with the attack spec (name and parameters)")
    p.add_argument(
        "--attack-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an attack parameter, e.g. target=0 or, for custom, pattern=trigger.png alpha=0.5 "
        "mask=mask.png row=-1 col=-1 (repeatable)",
    )


def _add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="127.0.0.1:8001", help="server address (gRPC 8001, HTTP 8000 by default)")
    p.add_argument("--protocol", default="grpc", choices=["grpc", "http"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fire", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a backdoored model (resumable, checkpoint per epoch)")
    t.add_argument("--dataset", default="cifar10", choices=["cifar10", "gtsrb"])
    t.add_argument("--arch", default="resnet_small")
    t.add_argument("--widths", type=int, nargs=3, default=[16, 32, 64])
    t.add_argument("--blocks", type=int, default=1)
    _add_attack_args(t, None)
    t.add_argument("--epochs", type=int, default=8)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--no-hflip", action="store_true", help="no horizontal flips (use for traffic signs)")
    t.add_argument("--train-subset", type=int, default=0, help="train on N random images (0 = all)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=0)
    t.add_argument("--out", required=True, help="model directory to write")
    t.set_defaults(func=cmd_train)

    rs = sub.add_parser("rescore", help="re-measure a trained model's CA / ASR / PA and update model.json")
    rs.add_argument("--model", required=True)
    rs.set_defaults(func=cmd_rescore)

    e = sub.add_parser("export", help="split a model after a layer and export both halves to ONNX")
    e.add_argument("--model", required=True, help="model directory (from fire train)")
    e.add_argument("--layer", default="layer2", help="sub-module to cut after (e.g. layer1, layer2, layer3)")
    e.add_argument("--layer2", help="multi-layer repair: a second, later cut (e.g. --layer layer1 --layer2 layer2)")
    e.add_argument("--out", required=True, help="export directory to write")
    e.set_defaults(func=cmd_export)

    c = sub.add_parser("calibrate", help="estimate the backdoor direction and write the direction file")
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
    _add_attack_args(c, None)
    c.set_defaults(func=cmd_calibrate)

    v = sub.add_parser("verify", help="check a direction file against an export before deploying it")
    v.add_argument("directions")
    v.add_argument("target", help="export directory, or a model in a repository (e.g. model_repository/cifar10)")
    v.set_defaults(func=cmd_verify)

    b = sub.add_parser("build-repo", help="write the Triton model repository (CPU + GPU profiles)")
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
    b.set_defaults(func=cmd_build_repo)

    be = sub.add_parser("build-engines", help="build missing TensorRT engines of a repository on this GPU")
    be.add_argument("--repo", default="model_repository")
    be.add_argument("--rebuild", action="store_true", help="rebuild engines that exist too")
    be.set_defaults(func=cmd_build_engines)

    s = sub.add_parser("serve", help="run tritonserver on a repository until Ctrl-C")
    s.add_argument("--repo", default="model_repository")
    s.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--grpc-port", type=int, default=8001)
    s.add_argument("--metrics-port", type=int, default=8002)
    s.add_argument("--profile", default="cpu", choices=["cpu", "gpu"])
    s.add_argument(
        "--model-control",
        default="explicit",
        choices=["none", "explicit"],
        help="explicit (default): load everything, allow hot reloads, run the stub watchdog",
    )
    s.add_argument("--tls-cert", help="PEM certificate: serve gRPC over TLS (with --tls-key)")
    s.add_argument("--tls-key", help="PEM private key for --tls-cert")
    s.set_defaults(func=cmd_serve)

    r = sub.add_parser("reload", help="hot-swap a protected model's direction file (zero failed requests)")
    r.add_argument("--url", default="127.0.0.1:8000", help="the server's HTTP address")
    r.add_argument("--repo", default="model_repository")
    r.add_argument("--model", required=True, help="protected model (or its _fire repair model)")
    r.add_argument("--directions", required=True, help="the new direction file")
    r.set_defaults(func=cmd_reload)

    up = sub.add_parser("update", help="streaming update: refine a served direction from reported samples")
    up.add_argument("--url", default="127.0.0.1:8000", help="the server's HTTP address")
    up.add_argument("--repo", default="model_repository")
    up.add_argument("--model", required=True, help="protected model (e.g. cifar10)")
    up.add_argument("--poisoned", nargs="+", required=True, help="images known/suspected triggered: files, dirs, .npz")
    up.add_argument("--clean", nargs="+", help="clean images (optional): files, dirs, .npz")
    up.add_argument("--min-samples", type=int, default=10, help="triggered reports before an update takes effect")
    up.add_argument("--max-step", type=float, default=0.5, help="largest move of beta per update, x |beta|")
    up.set_defaults(func=cmd_update)

    rb = sub.add_parser("rollback", help="reinstate an earlier direction version of a protected model")
    rb.add_argument("--url", default="127.0.0.1:8000", help="the server's HTTP address")
    rb.add_argument("--repo", default="model_repository")
    rb.add_argument("--model", required=True)
    rb.add_argument("--to", type=int, help="version to reinstate (default: the one before the live one)")
    rb.set_defaults(func=cmd_rollback)

    ev = sub.add_parser("eval", help="CA / ASR / PA of served models, measured through the server")
    _add_server_args(ev)
    ev.add_argument("--models", nargs="+", required=True)
    ev.add_argument("--dataset", default="cifar10", choices=["cifar10", "gtsrb"])
    ev.add_argument("--limit", type=int, default=0, help="evaluate a seeded subset of N test images")
    _add_attack_args(ev, None)
    ev.set_defaults(func=cmd_eval)

    k = sub.add_parser("classify", help="classify image files with a served model")
    _add_server_args(k)
    k.add_argument("--model", required=True)
    k.add_argument("--cifar10-names", action="store_true", help="print CIFAR-10 class names")
    k.add_argument("images", nargs="+")
    k.set_defaults(func=cmd_classify)

    bn = sub.add_parser(
        "bench",
        help="benchmarks: efficacy (attack zoo x defenses), serving (throughput, latency), adaptive (attacker), "
        "multimodel (one server, three protected models)",
    )
    bn.add_argument("which", choices=["efficacy", "serving", "adaptive", "multimodel"])
    bn.add_argument("--models", nargs="+", help="efficacy: model directories (default: the bundled zoo)")
    bn.add_argument("--n-poisoned", type=int, default=50, help="efficacy: triggered calibration samples")
    bn.add_argument("--limit", type=int, default=0, help="efficacy: a seeded subset of N test images (0 = all)")
    bn.add_argument("--no-ablations", action="store_true", help="efficacy: headline defenses only")
    bn.add_argument("--protocol", default="grpc", choices=["grpc", "http"])
    bn.add_argument("--profile", default="cpu", choices=["cpu", "gpu"])
    bn.add_argument("--quick", action="store_true", help="a short smoke run (numbers not meant to be reported)")
    bn.add_argument("--out", help="output directory (default: results/)")
    bn.set_defaults(func=cmd_bench)

    lt = sub.add_parser("loadtest", help="headless locust run against protected and plain models")
    lt.add_argument("--models", nargs="+", default=["cifar10", "cifar10_plain"])
    lt.add_argument("--protocol", default="grpc", choices=["grpc", "http"])
    lt.add_argument("--url", help="host:port of a running server (default: start one on --repo)")
    lt.add_argument("--repo", default="model_repository")
    lt.add_argument("--users", type=int, default=4)
    lt.add_argument("--spawn-rate", type=float, default=0, help="users started per second (default: all at once)")
    lt.add_argument("--run-time", type=int, default=20, help="seconds per model")
    lt.add_argument("--batch-size", type=int, default=1)
    lt.add_argument("--triggered-ratio", type=float, default=0.5)
    lt.add_argument("--dataset", default="cifar10", choices=["cifar10", "gtsrb"])
    lt.add_argument("--attack", default="badnets")
    lt.add_argument("--out", default="results/loadtest")
    lt.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --url")
    lt.set_defaults(func=cmd_loadtest)

    so = sub.add_parser("soak", help="bounded soak: fixed rate, both protocols, errors/RSS/shm watched")
    so.add_argument("--repo", default="model_repository")
    so.add_argument("--model", default="cifar10")
    so.add_argument("--minutes", type=float, default=10)
    so.add_argument("--rate", type=float, default=40, help="requests per second, gRPC and HTTP together")
    so.add_argument("--batch-size", type=int, default=4)
    so.add_argument("--out", default="results/soak.md")
    so.set_defaults(func=cmd_soak)

    d = sub.add_parser("demo", help="the main job: protect the bundled model, serve it, compare CA/ASR/PA")
    d.add_argument("--model", default=str(Path(__file__).resolve().parent.parent / "models" / "cifar10_resnet_badnets"))
    d.add_argument("--name", default="cifar10", help="name of the protected model on the server")
    d.add_argument("--layer", default="layer2")
    d.add_argument("--mode", default="project", choices=["subtract", "project", "gated"])
    d.add_argument("--n-poisoned", type=int, default=200)
    d.add_argument("--protocol", default="grpc", choices=["grpc", "http"])
    d.add_argument("--limit", type=int, default=0, help="evaluate on a subset of N test images (0: all)")
    d.add_argument("--results", default="results/demo.md", help="markdown report to write ('' for none)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
