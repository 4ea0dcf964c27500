"""Measuring: ``fire eval``, ``classify``, ``bench <benchmark>``, ``loadtest``, ``soak``, and the ``demo``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fire_backend.names import PROJECT_ROOT
from fire_cli.common import (
    UsageError,
    add_attack_args,
    add_command,
    add_repo_arg,
    add_server_args,
    attack_spec,
    server_url,
)
from fire_cli.options import add, add_fields, config_from, default_of

RESULTS = PROJECT_ROOT / "results"


def _recorded(a: argparse.Namespace):
    """The first protected model among ``a.models`` found in ``a.repo``: what its direction file records."""
    from serving.repository import served_model

    for model in a.models:
        try:
            return served_model(a.repo, model)
        except (ValueError, OSError):
            continue
    return None


def _evaluate_images(a: argparse.Namespace) -> None:
    """``fire eval --clean / --triggered``: the user's own images, any served model."""
    from calibration.imagesets import read_image_set
    from clients import evaluate_images
    from modelio.preprocess import Preprocess
    from serving.repository import traffic_for
    from zoo.metrics import format_table

    traffic = traffic_for(a.repo, a.models[0])
    if not traffic.preprocess:
        raise UsageError(f"no preprocessing recorded for {a.models[0]} in {a.repo}: evaluate with --dataset")
    pre = Preprocess.from_dict(traffic.preprocess)
    size = (pre.height, pre.width)
    clean = read_image_set(a.clean, size, a.resize) if a.clean else None
    if clean is not None and clean.labels is None:
        raise UsageError("the clean images need labels for CA (an ImageFolder class/xxx.png, or .npz labels)")
    triggered = read_image_set(a.triggered, size, a.resize) if a.triggered else None
    target = a.target if a.target is not None else traffic.attack.get("target") if a.triggered else None
    results = evaluate_images(server_url(a), a.models, clean, triggered, target, pre, a.protocol)
    print(f"your images: {len(clean) if clean else 0} clean, {len(triggered) if triggered else 0} triggered"
          + (f" (target class {target})" if target is not None else ""))  # fmt: skip
    print(format_table(results))


def evaluate(a: argparse.Namespace) -> None:
    if a.clean or a.triggered:
        return _evaluate_images(a)
    from clients import evaluate_served
    from modelio.preprocess import Preprocess
    from zoo.attacks import attack_from_spec
    from zoo.metrics import format_table

    served = _recorded(a)
    recorded = served.directions.extra.get("attack") if served else None
    spec = attack_spec(a, recorded)
    if not spec:
        raise UsageError(f"name the attack to measure with --attack (no direction file in {a.repo} records one)")
    source = "--attack" if (a.attack or a.attack_config) else f"recorded in {served.name}'s direction file"
    dataset = a.dataset or (served.directions.extra.get("dataset") if served else None) or "cifar10"
    pre = Preprocess.from_dict(served.preprocess) if served and served.preprocess else None
    io = (served.input_name, served.output_name) if served else None
    print(f"attack: {spec['name']} ({source}); dataset: {dataset} test split")
    results = evaluate_served(server_url(a), a.models, dataset, attack_from_spec(spec), a.protocol, limit=a.limit,
                              preprocess=pre, io=io)  # fmt: skip
    print(format_table(results))


def classify(a: argparse.Namespace) -> None:
    from calibration.imagesets import read_image_set
    from clients import FireClient
    from modelio.preprocess import Preprocess
    from serving.repository import traffic_for
    from zoo.metrics import predict_labels

    traffic = traffic_for(a.repo, a.model)
    pre = Preprocess.from_dict(traffic.preprocess) if traffic.preprocess else None
    size = (pre.height, pre.width) if pre else (32, 32)
    images = read_image_set(a.images, size, resize=True).images
    client = FireClient(server_url(a), a.protocol)
    labels = predict_labels(client.predictor(a.model), images, prepare=pre.apply) if pre else \
        predict_labels(client.predictor(a.model), images)  # fmt: skip
    names = Path(a.labels).read_text().split("\n") if a.labels else _label_file(a.repo, a.model)
    for path, label in zip(a.images, labels, strict=True):
        name = f" ({names[label]})" if names and label < len(names) else ""
        print(f"{path}\t{label}{name}")


def _label_file(repository: str, model: str) -> list[str] | None:
    from fire_backend.names import LABELS_FILE

    path = Path(repository) / model / LABELS_FILE
    return path.read_text().split("\n") if path.is_file() else None


# -- benchmarks: one sub-subcommand each, with the flags of its config ---------------------------------


def _out_dir(a: argparse.Namespace) -> Path:
    return Path(a.out) if a.out else RESULTS


def _bench_efficacy(a: argparse.Namespace) -> None:
    from benchmarks.efficacy import EfficacyConfig, run_efficacy

    cfg = EfficacyConfig.quick() if a.quick else EfficacyConfig()
    cfg.n_poisoned, cfg.n_clean, cfg.ablations, cfg.seed = a.n_poisoned, a.n_clean, not a.no_ablations, a.seed
    cfg.test_limit = a.limit or cfg.test_limit
    if a.model_dirs:
        cfg.models = tuple(a.model_dirs)
    cfg.out = str(_out_dir(a))
    for path in run_efficacy(cfg):
        print(path)


def _bench_multimodel(a: argparse.Namespace) -> None:
    from benchmarks.multimodel import MultiModelConfig, run_multimodel

    cfg = MultiModelConfig(out=str(_out_dir(a) / "multimodel.md"))
    r = run_multimodel(cfg)
    print(Path(cfg.out).read_text())
    if not r.passed:
        raise UsageError("the multimodel benchmark's checks failed (see the table above)")


def _bench_adaptive(a: argparse.Namespace) -> None:
    from benchmarks.adaptive import AdaptiveConfig, run_adaptive

    cfg = AdaptiveConfig.quick() if a.quick else AdaptiveConfig()
    if a.model_dirs:
        cfg.models = tuple(a.model_dirs)
    cfg.layer, cfg.out_dir, cfg.every_cut, cfg.keep_others = a.cut, _out_dir(a), a.every_cut, a.keep_others
    if cfg.keep_others and not a.model_dirs:
        raise UsageError(
            "--keep-others keeps the rows of the models not named: name the ones to measure with --model-dirs"
        )
    print(run_adaptive(cfg).read_text())


def _bench_serving(a: argparse.Namespace) -> None:
    from benchmarks.serving import ServingBenchConfig, main

    if a.quick:
        cfg = ServingBenchConfig.quick()
    else:
        cfg = ServingBenchConfig.large() if a.size == 224 else ServingBenchConfig()
    cfg.protocol, cfg.profile, cfg.out_dir = a.protocol, a.profile, _out_dir(a)
    main(cfg)


def _bench_own_model(a: argparse.Namespace) -> None:
    from benchmarks.own_model.run import OwnModelConfig, run_own_model

    cfg = OwnModelConfig.quick() if a.quick else OwnModelConfig()
    cfg.out = _out_dir(a) / "own_model.md"
    print(run_own_model(cfg).read_text())


def _bench_memory(a: argparse.Namespace) -> None:
    from benchmarks.memory import MemoryConfig, run_memory

    cfg = MemoryConfig(counts=(1, 3)) if a.quick else MemoryConfig()
    cfg.out = _out_dir(a) / "memory.md"
    print(run_memory(cfg).read_text())


def _bench_traffic(a: argparse.Namespace) -> None:
    from benchmarks.traffic import TrafficBenchConfig, run_traffic

    cfg = TrafficBenchConfig.quick() if a.quick else TrafficBenchConfig()
    cfg.out = _out_dir(a)
    print(run_traffic(cfg).read_text())


def _bench_gateway(a: argparse.Namespace) -> None:
    from benchmarks.gateway_load import GatewayLoadConfig, run_gateway_load

    cfg = GatewayLoadConfig.quick() if a.quick else GatewayLoadConfig()
    cfg.out = _out_dir(a) / "gateway_load.md"
    print(run_gateway_load(cfg).read_text())


def _bench_fleet(a: argparse.Namespace) -> None:
    from benchmarks.fleet import FleetBenchConfig, main

    cfg = FleetBenchConfig.quick() if a.quick else FleetBenchConfig()
    cfg.out = _out_dir(a) / ("fleet-quick.md" if a.quick else "fleet.md")
    print(main(cfg).read_text())


def _register_benchmarks(sub) -> None:
    bench = add_command(sub, "bench", "run a benchmark; results (tables, CSV, PNG) go to results/", None)
    which = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")

    def benchmark(name: str, text: str, func, quick: bool = True) -> argparse.ArgumentParser:
        p = add_command(which, name, text, func)
        add(p, "--out", detail=f"the results directory (default {RESULTS.relative_to(PROJECT_ROOT)}/)")
        if quick:
            add(p, "--quick")
        return p

    e = benchmark("efficacy", "the attack zoo x FIRE and input-transform defenses (CA / ASR / PA)", _bench_efficacy)
    from benchmarks.efficacy import EfficacyConfig

    add(e, "--model-dirs", detail="default: the bundled zoo")
    add_fields(e, EfficacyConfig, {"n_poisoned": "--n-poisoned", "n_clean": "--n-clean", "seed": "--seed"})
    add(e, "--limit", default=0)
    add(e, "--no-ablations")
    s = benchmark("serving", "throughput and latency of the protected model beside the unprotected ones",
                  _bench_serving)  # fmt: skip
    add(s, "--protocol", default="grpc")
    add(s, "--profile", default="cpu")
    add(s, "--size", default=32)
    ad = benchmark("adaptive", "trigger variants the models learned: FIRE beside STRIP, SCALE-UP, Februus, "
                   "fine-pruning", _bench_adaptive)  # fmt: skip
    add(ad, "--model-dirs", detail="default: every backdoored zoo model")
    add(ad, "--cut", default="layer2")
    add(ad, "--every-cut")
    add(ad, "--keep-others")
    benchmark("multimodel", "one server, three protected models: unload, load and update under load",
              _bench_multimodel, quick=False)  # fmt: skip
    benchmark("own-model", "a torchvision model with a backdoor, and a 224x224 one", _bench_own_model)
    benchmark("memory", "memory per protected model", _bench_memory)
    benchmark("traffic", "FIRE calibrated from unlabeled traffic, beside other defenses", _bench_traffic)
    benchmark("gateway", "the gateway under slow-body and idle-connection load", _bench_gateway)
    benchmark("fleet", "the Deployment's shape on loopback: a rollout and a killed pod under load, p99 by replicas",
              _bench_fleet)  # fmt: skip


# -- load --------------------------------------------------------------------------------------------

LOADTEST_FIELDS = {"models": "--models", "protocol": "--protocol", "users": "--users", "spawn_rate": "--spawn-rate",
                   "run_time_s": "--run-time", "batch_size": "--batch-size", "triggered_ratio": "--triggered-ratio",
                   "dataset": "--dataset", "attack": "--attack", "allow_remote": "--allow-remote", "clean": "--clean",
                   "triggered": "--triggered", "target": "--target"}  # fmt: skip


def loadtest(a: argparse.Namespace) -> None:
    from loadtest.runner import LoadTestConfig, run_loadtest

    cfg = config_from(LoadTestConfig, a, LOADTEST_FIELDS, url=a.url, repository=Path(a.repo), out_dir=Path(a.out))
    cfg.spawn_rate = cfg.spawn_rate or cfg.users
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
        raise UsageError(f"the soak's checks failed (see {cfg.out})")


def demo(a: argparse.Namespace) -> None:
    from calibration import CalibrationConfig
    from fire_cli.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        model_dir=Path(a.model_dir),
        name=a.model,
        layer=a.cut,
        pixels=a.pixels,
        protocol=a.protocol,
        limit=a.limit,
        calibration=CalibrationConfig(mode=a.mode, n_poisoned=a.n_poisoned),
        results=Path(a.out) if a.out else None,
        command="fire " + " ".join(sys.argv[1:]),
    )
    print(run_demo(cfg))


def register(sub) -> None:
    from loadtest.runner import LoadTestConfig
    from loadtest.soak import SoakConfig

    ev = add_command(sub, "eval", "CA / ASR / PA of served models, measured through the server", evaluate)
    add_server_args(ev)
    add(ev, "--models", required=True)
    add_repo_arg(ev, detail="where the attack and preprocessing are recorded")
    add(ev, "--dataset", detail="default: the one recorded, else cifar10")
    add(ev, "--limit", default=0)
    add_attack_args(ev)
    add(ev, "--clean", detail="your labeled clean images instead of a dataset: CA")
    add(ev, "--triggered", detail="your triggered images: ASR and PA")
    add(ev, "--target", detail="with --triggered")
    add(ev, "--resize")

    k = add_command(sub, "classify", "classify image files with a served model", classify)
    add_server_args(k)
    add(k, "--model", required=True)
    add_repo_arg(k, detail="where the model's preprocessing and label file are")
    add(k, "--labels", detail="default: the served model's label file, if it has one")
    k.add_argument("images", nargs="+", help="image files")

    _register_benchmarks(sub)

    lt = add_command(sub, "loadtest", "headless locust run against protected and plain models", loadtest)
    add_fields(lt, LoadTestConfig, LOADTEST_FIELDS, {"spawn_rate": "0: all at once",
               "clean": "your images instead of a dataset", "triggered": "default: the attack put on --clean",
               "target": "with --triggered"})  # fmt: skip
    add(lt, "--url", detail="of a running server (default: start one on --repo)")
    add_repo_arg(lt)
    add(lt, "--out", default="results/loadtest", detail="the results directory")

    so = add_command(sub, "soak", "bounded soak: fixed rate, both protocols, errors/RSS/shm watched", soak)
    add_repo_arg(so)
    add(so, "--model", default=default_of(SoakConfig, "model"))
    add(so, "--minutes", default=10.0)
    add(so, "--rate", default=default_of(SoakConfig, "rate_per_s"))
    add(so, "--batch-size", default=default_of(SoakConfig, "batch_size"))
    add(so, "--out", default="results/soak.md", detail="the report")

    from calibration import CalibrationConfig
    from fire_cli.demo import DemoConfig

    d = add_command(sub, "demo", "the main job: protect the bundled model, serve it, compare CA/ASR/PA", demo)
    add(d, "--model-dir", default=str(default_of(DemoConfig, "model_dir")))
    add(d, "--model", default=default_of(DemoConfig, "name"), detail="the protected model's name on the server")
    add(d, "--cut", default=default_of(DemoConfig, "layer"))
    add(d, "--pixels", default=default_of(DemoConfig, "pixels"))
    add(d, "--mode", default=default_of(CalibrationConfig, "mode"))
    add(d, "--n-poisoned", default=default_of(CalibrationConfig, "n_poisoned"))
    add(d, "--protocol", default=default_of(DemoConfig, "protocol"))
    add(d, "--limit", default=default_of(DemoConfig, "limit"))
    add(d, "--out", default=str(default_of(DemoConfig, "results")), detail="the markdown report ('' for none)")
