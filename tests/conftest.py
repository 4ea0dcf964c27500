"""Shared fixtures: the committed backdoored models, their exports and directions, a real tritonserver.

Everything is real: committed checkpoints trained by `fire train`, CIFAR-10/GTSRB test subsets, the
tritonserver binary from nvidia-pytriton. Session-scoped so the suite pays for each step once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from calibration import CalibrationConfig, calibrate
from modelio.export import ExportInfo, export_split
from serving.repository import ProtectedModel, Variant, build_repository
from serving.server import ServerConfig, TritonServer
from zoo.attacks import Attack, attack_from_spec
from zoo.data import Split, load_dataset

REPO = Path(__file__).resolve().parent.parent
# fixtures that run the real pipeline: a test using any of them (directly or through another fixture)
# is an integration test; so is one that starts a server itself (marked in its module)
PIPELINE_FIXTURES = {"artifacts", "repository", "server"}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if PIPELINE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _only_integration_tests_start_servers(request, monkeypatch):
    """An unmarked test that starts a tritonserver fails: the quick loop must never start one."""
    if request.node.get_closest_marker("integration"):
        return

    def refuse(self, *a, **kw):
        raise AssertionError(f"{request.node.nodeid} starts a tritonserver: mark it @pytest.mark.integration")

    monkeypatch.setattr(TritonServer, "start", refuse)


MODELS = {"cifar10": REPO / "models" / "cifar10_resnet_badnets", "gtsrb": REPO / "models" / "gtsrb_resnet_badnets"}


@dataclass
class Artifact:
    name: str
    model_dir: Path
    export_dir: Path
    directions: Path
    info: ExportInfo
    attack: Attack
    test: Split  # a small seeded subset of the test split


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> dict[str, Artifact]:
    out = {}
    for name, model_dir in MODELS.items():
        export_dir = tmp_path_factory.mktemp(f"export_{name}")
        info = export_split(model_dir, "layer2", export_dir, n_check=64)
        directions = export_dir / "directions.safetensors"
        calibrate(export_dir, directions, CalibrationConfig(n_poisoned=100, n_clean=300))
        test = load_dataset(info.dataset, "test").subset(300, seed=1)
        out[name] = Artifact(name, model_dir, export_dir, directions, info, attack_from_spec(info.attack), test)
    return out


@pytest.fixture(scope="session")
def repository(artifacts, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("model_repository")
    variants = (Variant.of_mode("subtract"), Variant.of_mode("gated"))
    # test_metrics reads the per-sample scores: detailed metrics
    extras = {"cifar10": dict(variants=variants, fused=True, whole=True, metrics="detailed")}
    build_repository(
        [
            ProtectedModel(a.name, a.export_dir, a.directions, plain=True, **extras.get(a.name, {}))
            for a in artifacts.values()
        ],
        repo,
    )
    return repo


@pytest.fixture(scope="session")
def server(repository):
    with TritonServer(ServerConfig(repository, http_port=0, grpc_port=0, metrics_port=0)) as s:
        yield s


def triggered_subset(a: Artifact, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Triggered test images whose true class is not the target, with their true labels."""
    keep = a.test.labels != a.attack.target
    return a.attack.apply(a.test.images[keep][:n]), a.test.labels[keep][:n]


def fire_fails(argv: list[str], capsys) -> str:
    """Run ``fire argv`` in process, expecting the one-line failure (exit 2); its message."""
    from fire_cli.main import EXIT_FAILED, main

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == EXIT_FAILED and "Traceback" not in err, err
    return err
