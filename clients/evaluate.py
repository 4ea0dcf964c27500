"""CA / ASR / PA measured through the server, for any set of served models."""

from __future__ import annotations

import numpy as np

from calibration.imagesets import ImageSet
from clients.triton_client import FireClient
from fire_backend.errors import InvalidInputError
from modelio.preprocess import Preprocess
from zoo.attacks import Attack
from zoo.data import load_dataset, to_tensor_batch
from zoo.metrics import BackdoorMetrics, backdoor_metrics, predict_labels


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


def _share(predict, images: ImageSet | None, wanted, preprocess: Preprocess, batch_size: int, desc: str) -> float:
    if images is None or wanted is None:
        return float("nan")
    pred = predict_labels(predict, images.images, batch_size, desc, preprocess.apply)
    return float((pred == wanted).mean())


def evaluate_images(
    url: str,
    models: list[str],
    clean: ImageSet | None,
    triggered: ImageSet | None,
    target: int | None,
    preprocess: Preprocess,
    protocol: str = "grpc",
    batch_size: int = 64,
) -> dict[str, BackdoorMetrics]:
    """CA on the user's labeled clean images; ASR (classified as ``target``) and PA (as their true label) on
    the user's triggered images, labeled with their true classes (those of the target class left out);
    each model through the server. A metric without its images is NaN."""
    if triggered is not None and triggered.labels is None:
        raise InvalidInputError("the triggered images need their true labels (an ImageFolder or an .npz with labels)")
    if triggered is not None and target is None:
        raise InvalidInputError("name the attacker's class with --target (no direction file records one)")
    trig = None
    if triggered is not None:
        keep = triggered.labels != target
        trig = ImageSet(triggered.images[keep], triggered.labels[keep])
    client = FireClient(url, protocol, max_batch_size=batch_size)
    out = {}
    for m in models:
        predict = client.predictor(m)
        out[m] = BackdoorMetrics(
            ca=_share(predict, clean, None if clean is None else clean.labels, preprocess, batch_size, f"{m} clean"),
            asr=_share(
                predict,
                trig,
                None if trig is None else np.full(len(trig), target),
                preprocess,
                batch_size,
                f"{m} triggered",
            ),  # fmt: skip
            pa=_share(predict, trig, None if trig is None else trig.labels, preprocess, batch_size, f"{m} triggered"),
            n_clean=0 if clean is None else len(clean),
            n_triggered=0 if trig is None else len(trig),
        )
    return out
