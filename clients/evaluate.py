"""CA / ASR / PA measured through the server, for any set of served models."""

from __future__ import annotations

from clients.triton_client import FireClient
from zoo.attacks import Attack
from zoo.data import load_dataset
from zoo.metrics import BackdoorMetrics, backdoor_metrics


def evaluate_served(
    url: str,
    models: list[str],
    dataset: str,
    attack: Attack,
    protocol: str = "grpc",
    limit: int = 0,
    batch_size: int = 64,
) -> dict[str, BackdoorMetrics]:
    """Evaluate each model on the test split (or a seeded ``limit``-sized subset of it)."""
    test = load_dataset(dataset, "test")
    if limit:
        test = test.subset(limit, seed=0)
    client = FireClient(url, protocol, max_batch_size=batch_size)
    return {m: backdoor_metrics(client.predictor(m), test, attack, batch_size=batch_size, desc=m) for m in models}
