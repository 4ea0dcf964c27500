"""CA / ASR / PA measured through the server, for any set of served models."""

from __future__ import annotations

from clients.triton_client import FireClient
from fire_backend.names import INPUT, LOGITS
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
    io: tuple[str, str] = (INPUT, LOGITS),
) -> dict[str, BackdoorMetrics]:
    """Evaluate each model on the test split (or a seeded ``limit``-sized subset of it). ``preprocess`` and
    ``io`` (input and output tensor names): how the served model takes its input (default: zoo models)."""
    test = load_dataset(dataset, "test")
    if limit:
        test = test.subset(limit, seed=0)
    client = FireClient(url, protocol, max_batch_size=batch_size)
    prepare = preprocess.apply if preprocess else to_tensor_batch
    return {
        m: backdoor_metrics(client.predictor(m, *io), test, attack, batch_size=batch_size, desc=m, prepare=prepare)
        for m in models
    }
