"""Runtime baselines FIRE is compared with, one per file behind ``base.Defense``: STRIP and SCALE-UP
(input-level detectors that reject), Februus-style restoration (Grad-CAM + inpainting: serves another
label), fine-tuning and fine-pruning (a changed model)."""

from benchmarks.defenses.base import REJECTED, Context, Defense, Outcome, auroc, detection, threshold_at_fpr, timed
from benchmarks.defenses.februus import Februus
from benchmarks.defenses.fine_pruning import FinePruning
from benchmarks.defenses.scale_up import ScaleUp
from benchmarks.defenses.strip import Strip

__all__ = ["REJECTED", "Context", "Defense", "Februus", "FinePruning", "Outcome", "ScaleUp", "Strip", "auroc",
           "detection", "threshold_at_fpr", "timed"]  # fmt: skip
