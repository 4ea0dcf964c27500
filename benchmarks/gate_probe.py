"""A probe of a repair gate FIRE does not serve: gating the ``project`` repair on the energy of a sample's
scores over the whole span (the sum of their squares) instead of on the first score.

The served project repair moves a sample when its score along the first direction is past the clean mean,
or every sample when that gate would let a view or a half-strength trigger
through (``calibration.estimators.covers``). Clean images moved cost clean accuracy; a gate whose threshold
is a high quantile of clean images' energy would leave most of them alone. The quantiles are read on clean
training images the estimate did not see: its readout is fitted to the clean calibration images and reads
them at an energy of about 0, so their quantiles would put every other image above the gate. This measures,
in process, what that gate would do to CA and to the trigger variants, on the FIRE paired estimate at
``layer2`` (the same file ``fire bench adaptive`` measures as "FIRE paired"), each model's whole test
split. Nothing here is served: it is the measurement behind docs/benchmarks/adaptive.md's "Measured, not
built" section. ``python -m benchmarks.gate_probe`` writes results/gate_probe.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.adaptive import AdaptiveConfig, _metrics, _Model, fire_repairs
from benchmarks.variants import variants
from fire_backend.formula import scores
from fire_backend.names import PROJECT_ROOT
from zoo.data import load_dataset

MODELS = ("cifar10_resnet_badnets", "cifar10_resnet_blended", "cifar10_resnet_sig", "cifar10_resnet_wanet")
QUANTILES = (0.5, 0.9, 0.95)  # the energy gate's threshold: these quantiles of the held-out clean energy
VARIANTS = ("calibrated", "mirrored left-right", "scaled 2.5x", "dimmed 60 %")


def energy_gated(params, tau: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """The served project repair (``formula``'s parameters) with its gate replaced: a sample is moved when
    the sum of its squared scores exceeds ``tau``."""

    def edit(f: torch.Tensor) -> torch.Tensor:
        flat = f.reshape(len(f), -1)
        s = scores(flat, params)
        moved = (s * s).sum(1, keepdim=True) > tau
        return (flat - (moved * s * params.weights) @ params.directions).reshape(f.shape)

    return edit


def held_out_clean(m: _Model, cfg: AdaptiveConfig) -> np.ndarray:
    """``cfg.n_clean`` clean training images, none of them one the estimate saw (clean or paired original)."""
    train = load_dataset(m.dataset, "train")
    seen = {x.tobytes() for x in (*m.calib.clean, *m.calib.originals)}
    order = np.random.default_rng(cfg.seed + 1).permutation(len(train.images))
    return np.stack([train.images[i] for i in order if train.images[i].tobytes() not in seen][: cfg.n_clean])


def probe(name: str, cfg: AdaptiveConfig) -> list[str]:
    m = _Model(name, cfg)
    r = m.runner
    repair = fire_repairs(m, cfg.layer)["FIRE paired"]
    p = repair.params
    energy = lambda f: (scores(f.reshape(len(f), -1), p) ** 2).sum(1).numpy()  # noqa: E731
    clean_energy = energy(r.features(held_out_clean(m, cfg)))
    calib_energy = energy(r.features(m.calib.clean))
    triggered_energy = energy(r.features(m.calib.triggered))
    gates = {"served (first score" + (", off)" if p.tau == -np.inf else ")"): repair}
    gates |= {
        f"energy > clean q{round(100 * q)}": energy_gated(p, float(np.quantile(clean_energy, q))) for q in QUANTILES
    }
    clean_f = r.features(m.test.images)
    base = r.labels(clean_f)
    ca0 = 100 * float((base == m.test.labels).mean())
    made = variants(m.attack)
    feats = {v: r.features(made[v](m.x)) for v in VARIANTS if v in made}
    lines = []
    for gate, edit in gates.items():
        ca = 100 * float((r.labels_after(clean_f, base, edit) == m.test.labels).mean())
        cells = ["{:.1f} / {:.1f}".format(*_metrics(r.labels(feats[v], edit), m.true, m.wanted)) if v in feats else ""
                 for v in VARIANTS]  # fmt: skip  # a variant the attack has not (scaled: WaNet, SIG): blank
        lines.append(f"| {name} | {gate} | {ca0 - ca:.2f} | " + " | ".join(cells) + " |")
    q = np.quantile(clean_energy, (0.5, 0.99))
    lines.append(f"| {name} | energy: clean held out median {q[0]:.0f}, q99 {q[1]:.0f} (clean calibration "
                 f"median {np.median(calib_energy):.2g}); triggered calibration least {triggered_energy.min():.0f}, "
                 f"median {np.median(triggered_energy):.0f} | | | | | |")  # fmt: skip
    return lines


def main(models: tuple[str, ...] = MODELS, out: Path = PROJECT_ROOT / "results" / "gate_probe.md") -> Path:
    torch.set_num_threads(2)
    cfg, t0 = AdaptiveConfig(), time.time()
    rows = [line for name in tqdm(models, desc="gate probe", unit="model", disable=None) for line in probe(name, cfg)]
    out.write_text("\n".join([
        "# Probe: a project repair gated on the span's energy (not served)",
        "",
        f"`python -m benchmarks.gate_probe` ({time.time() - t0:.0f} s, 2 cores): FIRE paired at `{cfg.layer}` "
        f"(the default views, {cfg.n_poisoned} pairs, {cfg.n_clean} clean training images), in process, each "
        "model's whole test split: CA drop, and ASR / PA on the non-target test images with each variant. The "
        f"energy gate's threshold: a quantile of {cfg.n_clean} other clean training images' energy.",
        "",
        "| model | gate | CA drop | " + " | ".join(VARIANTS) + " |",
        "|---|---|---:|" + "---:|" * len(VARIANTS),
        *rows,
        "",
    ]))  # fmt: skip
    return out


if __name__ == "__main__":
    print(main().read_text())
