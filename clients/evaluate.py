"""CA / ASR / PA measured through the server, for any set of served models."""

from __future__ import annotations

from clients.triton_client import FireClient
from modelio.preprocess import Preprocess
from zoo.attacks import Attack
from zoo.data import load_dataset, to_tensor_batch
from zoo.metrics import BackdoorMetrics, backdoor_metrics


def evaluate_served(
    url: str,
    models: list[str],
    dataset: str,
    attack: Attack,
    protocol: str = "grpc",
    limit: int = 0,
    batch_size: int = 64,
    preprocess: Preprocess | None = None,
    io: tuple[str, str] | None = None,
) -> dict[str, BackdoorMetrics]:
    """Evaluate each model on the test split (or a seeded ``limit``-sized subset of it). ``preprocess``:
    how images become the served input (default: a zoo model's float pixels); ``io``: the input and
    output tensor names (default: each model's own, from its metadata)."""
    test = load_dataset(dataset, "test")
    if limit:
        test = test.subset(limit, seed=0)
    client = FireClient(url, protocol, max_batch_size=batch_size)
    prepare = preprocess.apply if preprocess else to_tensor_batch
    return {
        m: backdoor_metrics(
            client.predictor(m, *(io or (None, None))), test, attack, batch_size=batch_size, desc=m, prepare=prepare
        )  # fmt: skip
        for m in models
    }
