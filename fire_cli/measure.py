"""Measuring: ``fire eval``, ``classify``, ``bench``, ``loadtest``, ``soak``, and the ``demo``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fire_cli.common import DEFAULT_MODEL, add_attack_args, add_command, add_server_args, attack_spec


def _recorded(a: argparse.Namespace):
    """The first protected model among ``a.models`` found in ``a.repo``: what its direction file records."""
    from serving.repository import served_model

    for model in a.models:
        try:
            return served_model(a.repo, model)
        except (ValueError, OSError):
            continue
    return None


def evaluate(a: argparse.Namespace) -> None:
    from clients import evaluate_served
    from modelio.preprocess import Preprocess
    from zoo.attacks import attack_from_spec
    from zoo.metrics import format_table

    served = _recorded(a)
    recorded = served.directions.extra.get("attack") if served else None
    spec = attack_spec(a, recorded)
    if not spec:
        raise SystemExit(f"name the attack to measure with --attack (no direction file in {a.repo} records one)")
    source = "--attack" if (a.attack or a.attack_config) else f"recorded in {served.name}'s direction file"
    dataset = a.dataset or (served.directions.extra.get("dataset") if served else None) or "cifar10"
    pre = Preprocess.from_dict(served.preprocess) if served and served.preprocess else None
    io = (served.input_name, served.output_name) if served else ("INPUT", "LOGITS")
    print(f"attack: {spec['name']} ({source}); dataset: {dataset} test split")
    results = evaluate_served(a.url, a.models, dataset, attack_from_spec(spec), a.protocol, limit=a.limit,
                              preprocess=pre, io=io)  # fmt: skip
    print(format_table(results))


def classify(a: argparse.Namespace) -> None:
    from clients import FireClient, load_images
    from zoo.data import CIFAR10_CLASSES

    labels = FireClient(a.url, a.protocol).classify(a.model, load_images(a.images))
    for path, label in zip(a.images, labels, strict=True):
        name = f" ({CIFAR10_CLASSES[label]})" if a.cifar10_names else ""
        print(f"{path}\t{label}{name}")


def _bench_efficacy(a: argparse.Namespace) -> None:
    from benchmarks.efficacy import EfficacyConfig, run_efficacy

    cfg = EfficacyConfig.quick() if a.quick else EfficacyConfig()
    cfg.n_poisoned, cfg.ablations = a.n_poisoned, not a.no_ablations
    cfg.test_limit = a.limit or cfg.test_limit
    if a.models:
        cfg.models = tuple(a.models)
    if a.out:
        cfg.out = a.out
    for path in run_efficacy(cfg):
        print(path)


def _bench_multimodel(a: argparse.Namespace) -> None:
    from benchmarks.multimodel import MultiModelConfig, run_multimodel

    cfg = MultiModelConfig()
    if a.out:
        cfg.out = str(Path(a.out) / "multimodel.md")
    r = run_multimodel(cfg)
    print(Path(cfg.out).read_text())
    if not r.passed:
        raise SystemExit(1)


def _bench_adaptive(a: argparse.Namespace) -> None:
    from benchmarks.adaptive import run

    print(run())


def _bench_serving(a: argparse.Namespace) -> None:
    from benchmarks.serving import ServingBenchConfig, main

    if a.quick:
        cfg = ServingBenchConfig.quick()
    else:
        cfg = ServingBenchConfig.large() if a.size == 224 else ServingBenchConfig()
    cfg.protocol, cfg.profile = a.protocol, a.profile
    if a.out:
        cfg.out_dir = Path(a.out)
    main(cfg)


def _bench_own_model(a: argparse.Namespace) -> None:
    from benchmarks.own_model.run import OwnModelConfig, run_own_model

    cfg = OwnModelConfig.quick() if a.quick else OwnModelConfig()
    if a.out:
        cfg.out = Path(a.out) / "own_model.md"
    print(run_own_model(cfg).read_text())


def _bench_memory(a: argparse.Namespace) -> None:
    from benchmarks.memory import MemoryConfig, run_memory

    cfg = MemoryConfig(counts=(1, 3)) if a.quick else MemoryConfig()
    if a.out:
        cfg.out = Path(a.out) / "memory.md"
    print(run_memory(cfg).read_text())


def _bench_traffic(a: argparse.Namespace) -> None:
    from benchmarks.traffic import TrafficBenchConfig, run_traffic

    cfg = TrafficBenchConfig.quick() if a.quick else TrafficBenchConfig()
    if a.out:
        cfg.out = Path(a.out)
    print(run_traffic(cfg).read_text())


def _bench_gateway(a: argparse.Namespace) -> None:
    from benchmarks.gateway_load import GatewayLoadConfig, run_gateway_load

    cfg = GatewayLoadConfig.quick() if a.quick else GatewayLoadConfig()
    if a.out:
        cfg.out = Path(a.out) / "gateway_load.md"
    print(run_gateway_load(cfg).read_text())


BENCHMARKS = {
    "gateway": _bench_gateway,
    "memory": _bench_memory,
    "traffic": _bench_traffic,
    "own-model": _bench_own_model,
    "efficacy": _bench_efficacy,
    "serving": _bench_serving,
    "adaptive": _bench_adaptive,
    "multimodel": _bench_multimodel,
}


def bench(a: argparse.Namespace) -> None:
    BENCHMARKS[a.which](a)


def loadtest(a: argparse.Namespace) -> None:
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


def soak(a: argparse.Namespace) -> None:
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


def demo(a: argparse.Namespace) -> None:
    from calibration import CalibrationConfig
    from fire_cli.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        model_dir=Path(a.model),
        name=a.name,
        layer=a.layer,
        protocol=a.protocol,
        limit=a.limit,
        calibration=CalibrationConfig(mode=a.mode, n_poisoned=a.n_poisoned),
        results=Path(a.results) if a.results else None,
        command="fire " + " ".join(sys.argv[1:]),
    )
    print(run_demo(cfg))


def register(sub) -> None:
    ev = add_command(sub, "eval", "CA / ASR / PA of served models, measured through the server", evaluate)
    add_server_args(ev)
    ev.add_argument("--models", nargs="+", required=True)
    ev.add_argument("--repo", default="model_repository", help="where the attack and preprocessing are recorded")
    ev.add_argument("--dataset", choices=["cifar10", "gtsrb"], help="default: the one recorded, else cifar10")
    ev.add_argument("--limit", type=int, default=0, help="evaluate a seeded subset of N test images")
    add_attack_args(ev, None)

    k = add_command(sub, "classify", "classify image files with a served model", classify)
    add_server_args(k)
    k.add_argument("--model", required=True)
    k.add_argument("--cifar10-names", action="store_true", help="print CIFAR-10 class names")
    k.add_argument("images", nargs="+")

    bn = add_command(
        sub,
        "bench",
        "benchmarks: efficacy (attack zoo x defenses), serving (throughput, latency), adaptive (attacker), "
        "multimodel (one server, three protected models), own-model (a torchvision model and a 224x224 one), "
        "memory (per protected model), traffic (FIRE calibrated from unlabeled traffic, beside other defenses)",
        bench,
    )
    bn.add_argument("which", choices=sorted(BENCHMARKS))
    bn.add_argument("--models", nargs="+", help="efficacy: model directories (default: the bundled zoo)")
    bn.add_argument("--n-poisoned", type=int, default=50, help="efficacy: triggered calibration samples")
    bn.add_argument("--limit", type=int, default=0, help="efficacy: a seeded subset of N test images (0 = all)")
    bn.add_argument("--no-ablations", action="store_true", help="efficacy: headline defenses only")
    bn.add_argument("--protocol", default="grpc", choices=["grpc", "http"])
    bn.add_argument("--profile", default="cpu", choices=["cpu", "gpu"])
    bn.add_argument("--quick", action="store_true", help="the benchmark's smoke preset (numbers not for reporting)")
    bn.add_argument("--size", type=int, default=32, choices=[32, 224], help="serving: CIFAR-10 model or 224x224 one")
    bn.add_argument("--out", help="output directory (default: results/)")

    lt = add_command(sub, "loadtest", "headless locust run against protected and plain models", loadtest)
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

    so = add_command(sub, "soak", "bounded soak: fixed rate, both protocols, errors/RSS/shm watched", soak)
    so.add_argument("--repo", default="model_repository")
    so.add_argument("--model", default="cifar10")
    so.add_argument("--minutes", type=float, default=10)
    so.add_argument("--rate", type=float, default=40, help="requests per second, gRPC and HTTP together")
    so.add_argument("--batch-size", type=int, default=4)
    so.add_argument("--out", default="results/soak.md")

    d = add_command(sub, "demo", "the main job: protect the bundled model, serve it, compare CA/ASR/PA", demo)
    d.add_argument("--model", default=str(DEFAULT_MODEL))
    d.add_argument("--name", default="cifar10", help="name of the protected model on the server")
    d.add_argument("--layer", default="layer2")
    d.add_argument("--mode", default="project", choices=["subtract", "project", "gated"])
    d.add_argument("--n-poisoned", type=int, default=200)
    d.add_argument("--protocol", default="grpc", choices=["grpc", "http"])
    d.add_argument("--limit", type=int, default=0, help="evaluate on a subset of N test images (0: all)")
    d.add_argument("--results", default="results/demo.md", help="markdown report to write ('' for none)")
