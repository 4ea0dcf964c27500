"""What the efficacy benchmark runs: models, sample budgets, ablations, output folder."""

from __future__ import annotations

from dataclasses import dataclass, field

from calibration.auto import AutoConfig

DEFAULT_MODELS = (
    "models/cifar10_resnet_badnets",
    "models/cifar10_resnet_blended",
    "models/cifar10_resnet_wanet",
    "models/cifar10_resnet_sig",
    "models/cifar10_resnet_trojan",
    "models/cifar10_resnet_all2all",
    "models/cifar10_vgg_badnets",
    "models/gtsrb_resnet_badnets12",  # 12 epochs: the 8-epoch bundled one stops at ASR 89.7 %
)


@dataclass
class EfficacyConfig:
    models: tuple[str, ...] = DEFAULT_MODELS
    n_poisoned: int = 50  # triggered calibration samples for the headline defenses
    n_clean: int = 1000  # clean calibration samples (the defender's own data)
    curve: tuple[int, ...] = (1, 5, 10, 50, 100, 500)
    fixed_layer: str = "layer2"  # where the fixed-setting FIRE rows repair
    ablations: bool = True
    test_limit: int = 0  # 0: the whole test split; N: a seeded subset (tests)
    auto: AutoConfig = field(default_factory=AutoConfig)
    seed: int = 0
    out: str = "results"
    plots: bool = True

    @classmethod
    def quick(cls) -> EfficacyConfig:
        """A smoke run: one model, 1,000 test images, a short curve and a small auto-calibration grid."""
        return cls(
            models=DEFAULT_MODELS[:1], test_limit=1000, curve=(1, 10, 50), auto=AutoConfig(alphas=(1.0,), ranks=(1, 2))
        )
