"""Shared by both locustfiles: command-line options, real test-split traffic, the live-ASR tally, and
the loopback guard. Imported by locust inside each locustfile's process."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field

import numpy as np
from locust import events

from fire_backend.network import host_of, is_loopback
from modelio.preprocess import Preprocess
from zoo.attacks import attack_from_spec
from zoo.data import load_dataset, to_tensor_batch


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    g = parser.add_argument_group("FIRE")
    g.add_argument("--model", default="cifar10", help="served model to call")
    g.add_argument("--batch-size", type=int, default=1, help="images per request")
    g.add_argument("--triggered-ratio", type=float, default=0.5, help="share of requests carrying the trigger")
    g.add_argument("--dataset", default="cifar10", choices=["cifar10", "gtsrb"])
    g.add_argument("--attack-spec", default='{"name": "badnets"}', help="JSON: the trigger on triggered requests")
    g.add_argument("--preprocess", default="", help="JSON (Preprocess.as_dict): how images become the model's "
                   "input (default: a zoo model's float pixels)")  # fmt: skip
    g.add_argument("--pool", type=int, default=1024, help="test images held in memory")
    g.add_argument("--images", default="", help=".npz of the user's images (clean, triggered, target) instead of "
                   "the dataset")  # fmt: skip
    g.add_argument("--tally-file", default="", help="write the live-ASR tally (JSON) here at the end")
    g.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host (off by default)")


@events.init.add_listener
def _loopback_guard(environment, **_) -> None:
    opts = environment.parsed_options
    if opts is None or getattr(opts, "allow_remote", False) or not environment.host:
        return
    if not is_loopback(host_of(environment.host)):
        raise SystemExit(
            f"refusing to load-test {environment.host}: not a loopback address "
            "(pass --allow-remote to target another machine you run)"
        )


class Traffic:
    """Batches of real test images, in the served model's input form (its declared preprocessing): clean
    ones, and triggered ones whose true class is not the target."""

    def __init__(self, dataset: str, attack_spec: dict, pool: int, batch_size: int, triggered_ratio: float,
                 preprocess: dict | None = None, images: str = ""):  # fmt: skip
        self.batch_size, self.ratio = batch_size, triggered_ratio
        prepare = Preprocess.from_dict(preprocess).apply if preprocess else to_tensor_batch
        if images:  # the user's own (loadtest.runner wrote them at the served size)
            with np.load(images) as z:
                self.clean, self.triggered, self.target = prepare(z["clean"]), prepare(z["triggered"]), int(z["target"])
        else:
            test = load_dataset(dataset, "test").subset(pool, seed=0)
            attack = attack_from_spec(attack_spec)
            self.target = attack.target
            self.clean = prepare(test.images)
            self.triggered = prepare(attack.apply(test.images[test.labels != attack.target]))
        if len(self.clean) < batch_size or len(self.triggered) < batch_size:
            raise SystemExit(f"fewer images than --batch-size {batch_size}")
        self.rng = np.random.default_rng()

    def next(self) -> tuple[np.ndarray, bool]:
        triggered = bool(self.rng.random() < self.ratio)
        source = self.triggered if triggered else self.clean
        start = int(self.rng.integers(0, len(source) - self.batch_size + 1))
        return source[start : start + self.batch_size], triggered


_traffic: Traffic | None = None
_lock = threading.Lock()


def traffic(options) -> Traffic:
    """One Traffic per process, built on first use from the locust options."""
    global _traffic
    with _lock:
        if _traffic is None:
            preprocess = json.loads(options.preprocess or "null")
            _traffic = Traffic(options.dataset, json.loads(options.attack_spec), options.pool, options.batch_size,
                               options.triggered_ratio, preprocess, options.images)  # fmt: skip
    return _traffic


@dataclass
class Tally:
    """Outcomes on triggered images: a response that is not an error can still be a successful attack."""

    triggered_images: int = 0
    triggered_to_target: int = 0
    clean_images: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, logits: np.ndarray, triggered: bool, target: int) -> None:
        with self.lock:
            if triggered:
                self.triggered_images += len(logits)
                self.triggered_to_target += int((logits.argmax(axis=1) == target).sum())
            else:
                self.clean_images += len(logits)

    def as_dict(self) -> dict:
        asr = self.triggered_to_target / self.triggered_images if self.triggered_images else None
        return {
            "triggered_images": self.triggered_images,
            "triggered_to_target": self.triggered_to_target,
            "clean_images": self.clean_images,
            "live_asr": asr,
        }


tally = Tally()


@events.test_stop.add_listener
def _write_tally(environment, **_) -> None:
    opts = environment.parsed_options
    result = tally.as_dict()
    print(f"FIRE live ASR tally: {json.dumps(result)}")
    if opts is not None and opts.tally_file:
        with open(opts.tally_file, "w") as f:
            json.dump(result, f)
