"""One server, many protected models: what each added model costs in memory, and that loading, unloading
or updating one leaves the others serving undisturbed.

Three protected models by default (CIFAR-10 ResNet, CIFAR-10 VGG-style, GTSRB ResNet), each with its own
direction file and its plain twin. The server starts in explicit model-control mode with nothing loaded;
the models are loaded one by one, recording the server's RSS and every Python-backend stub's RSS after
each. Then, while clients keep querying the first two, the third is unloaded, loaded again, and its
direction file hot-swapped; every answer the first two gave must be the expected one, none may fail.

    fire bench multimodel      # writes results/multimodel.md
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calibration import CalibrationConfig, calibrate
from clients import FireClient
from fire_backend.directions import DirectionFile
from fire_backend.names import DIRECTIONS_FILE, PROJECT_ROOT, REPOSITORY_DIR, ModelNames
from modelio.export import export_split
from serving.admin import load_model, unload_model
from serving.control import reload_directions
from serving.procfs import pss_mib, rss_mib, stubs
from serving.repository import ProtectedModel, build_repository
from serving.server import ServerConfig, TritonServer
from zoo.data import load_dataset, to_tensor_batch

DEFAULT_MODELS = {
    "cifar10": "models/cifar10_resnet_badnets",
    "cifar10_vgg": "models/cifar10_vgg_badnets",
    "gtsrb": "models/gtsrb_resnet_badnets",
}


@dataclass
class MultiModelConfig:
    models: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_MODELS))
    workdir: str = "build/multimodel"
    out: str = "results/multimodel.md"
    load_seconds: float = 4.0  # traffic kept up around each of unload / load / update
    clients_per_model: int = 2


def _unload(http_url: str, admin_key: str, model: str) -> None:
    unload_model(http_url, admin_key, model, timeout=60, dependents=True)


class Traffic:
    """Clients sending a fixed batch to each of ``models`` and checking every answer, until stopped."""

    def __init__(self, url: str, batches: dict[str, np.ndarray], expected: dict[str, np.ndarray], clients: int):
        self.stop_flag = threading.Event()
        self.counts = {m: 0 for m in batches}
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, args=(url, m, batches[m], expected[m]), daemon=True)
            for m in batches
            for _ in range(clients)
        ]

    def _run(self, url: str, model: str, x: np.ndarray, expected: np.ndarray) -> None:
        c = FireClient(url, "grpc", timeout_s=30)
        deadline = time.time() + 300
        while not self.stop_flag.is_set() and time.time() < deadline:
            try:
                ok = np.allclose(c.infer(model, x), expected, atol=1e-4)
                err = None if ok else "wrong answer"
            except Exception as e:  # noqa: BLE001 - any failure is recorded and fails the run
                err = str(e)
            with self.lock:
                self.counts[model] += 1
                if err:
                    self.failures.append(f"{model}: {err}")

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join()


def _group(server: TritonServer, name: str, action) -> None:
    for model in (name, ModelNames(name).plain):
        action(server.http_url, server.admin_key, model)


def prepare(cfg: MultiModelConfig) -> list[ProtectedModel]:
    """Export each model at layer2 and calibrate it (reused when already there)."""
    out = []
    for name, model_dir in cfg.models.items():
        export = Path(cfg.workdir) / "exports" / name
        directions = export / DIRECTIONS_FILE
        if not directions.is_file():
            export_split(PROJECT_ROOT / model_dir if not Path(model_dir).is_absolute() else model_dir, "layer2", export)
            calibrate(export, directions, CalibrationConfig(n_poisoned=100, n_clean=500))
        out.append(ProtectedModel(name, export, directions, plain=True))
    return out


@dataclass
class MultiModelResult:
    memory: list[dict]
    events: list[dict]
    failures: list[str]
    requests: dict[str, int]

    @property
    def passed(self) -> bool:
        return not self.failures and all(self.requests.values())


def run_multimodel(cfg: MultiModelConfig | None = None) -> MultiModelResult:
    cfg = cfg or MultiModelConfig()
    protected = prepare(cfg)
    repo = Path(cfg.workdir) / REPOSITORY_DIR
    build_repository(protected, repo)
    names = [m.name for m in protected]
    memory, events = [], []
    server_cfg = ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0, model_control="explicit")
    with TritonServer(server_cfg) as server:
        pid = server.process.pid
        time.sleep(1.0)
        memory.append({"step": "server, nothing loaded", "server_rss": rss_mib(pid), "stubs": {}, "stubs_pss": {}})
        for name in names:
            _group(server, name, load_model)  # an ensemble load brings its steps with it
            time.sleep(1.0)
            live = stubs(pid)
            memory.append(
                {
                    "step": f"+ {name} (+ plain twin)",
                    "server_rss": rss_mib(pid),
                    "stubs": {m: rss_mib(p) for p, m in live.items()},
                    "stubs_pss": {m: pss_mib(p) for p, m in live.items()},
                }
            )

        client = FireClient(server.grpc_url, "grpc")
        batches, expected = {}, {}
        for m in protected[:2]:
            test = load_dataset("gtsrb" if m.name.startswith("gtsrb") else "cifar10", "test").subset(8, seed=2)
            batches[m.name] = to_tensor_batch(test.images)
            expected[m.name] = client.infer(m.name, batches[m.name])
        other = protected[2]
        swapped = DirectionFile.load(other.directions)
        swapped.alpha = 0.5
        swapped_path = swapped.save(Path(cfg.workdir) / f"{other.name}_swapped.safetensors")
        with Traffic(server.grpc_url, batches, expected, cfg.clients_per_model) as traffic:
            for label, action in (
                (f"unload {other.name} (+ plain twin)", lambda: _group(server, other.name, _unload)),
                (f"load {other.name} (+ plain twin)", lambda: _group(server, other.name, load_model)),
                (
                    f"update {other.name}'s directions",
                    lambda: reload_directions(repo, ModelNames(other.name).repair, swapped_path, server.metrics_url),
                ),
            ):
                time.sleep(cfg.load_seconds / 2)
                before = dict(traffic.counts)
                t0 = time.time()
                action()
                took = time.time() - t0
                time.sleep(cfg.load_seconds / 2)
                served = {m: traffic.counts[m] - before[m] for m in before}
                events.append({"event": label, "seconds": took, "answers_meanwhile": served})
            ready = client.is_ready(other.name)
        events.append({"event": f"{other.name} ready afterwards", "seconds": 0.0, "answers_meanwhile": {}})
        if not ready:
            traffic.failures.append(f"{other.name} not ready after its reload")
    result = MultiModelResult(memory, events, traffic.failures, traffic.counts)
    write_report(result, cfg)
    return result


def write_report(r: MultiModelResult, cfg: MultiModelConfig) -> Path:
    lines = [
        "# One server, several protected models",
        "",
        f"`fire bench multimodel`: {', '.join(f'{k} ({v})' for k, v in cfg.models.items())}, CPU profile, "
        "explicit model control. RSS in MiB, read from /proc after each load.",
        "",
        "## Memory per added model",
        "",
        "RSS counts the pages every stub shares (the NumPy and onnxruntime libraries) once per stub; PSS "
        "splits shared pages among their users, so PSS is what the added model really costs the machine.",
        "",
        "| step | server RSS | + server | stubs | stub RSS (sum) | stub PSS (sum) | + stubs PSS | stub RSS each |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    prev_server, prev_pss = None, 0.0
    for m in r.memory:
        rss_sum, pss_sum = sum(m["stubs"].values()), sum(m["stubs_pss"].values())
        d_server = "" if prev_server is None else f"{m['server_rss'] - prev_server:+.0f}"
        each = ", ".join(f"{k} {v:.0f}" for k, v in sorted(m["stubs"].items()))
        lines.append(
            f"| {m['step']} | {m['server_rss']:.0f} | {d_server} | {len(m['stubs'])} | {rss_sum:.0f} | "
            f"{pss_sum:.0f} | {pss_sum - prev_pss:+.0f} | {each} |"
        )
        prev_server, prev_pss = m["server_rss"], pss_sum
    lines += [
        "",
        "## Changing one model while the others serve",
        "",
        f"{cfg.clients_per_model} gRPC clients per model on the first two models throughout, every answer "
        "compared with the one before the changes.",
        "",
        "| event | took (s) | answers from the other models meanwhile |",
        "|---|---:|---|",
    ]
    for e in r.events:
        served = ", ".join(f"{k}: {v}" for k, v in e["answers_meanwhile"].items())
        lines.append(f"| {e['event']} | {e['seconds']:.2f} | {served} |")
    verdict = "PASS" if r.passed else "FAIL"
    lines += ["", f"**{verdict}**: {sum(r.requests.values())} requests, {len(r.failures)} failed or wrong."]
    lines += [f"- {f}" for f in r.failures[:20]]
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    result = run_multimodel()
    print(Path(MultiModelConfig().out).read_text())
