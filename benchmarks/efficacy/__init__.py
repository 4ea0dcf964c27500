"""Efficacy benchmark: does FIRE stop the attacks in the zoo, and what does it cost clean accuracy?

For every model (each a backdoored model from ``fire train``, its attack read from model.json), on the
same test split and in one run:

- headline defenses: none; FIRE auto-calibrated (``calibration.auto``: layer, mode, alpha, rank chosen
  from the calibration samples alone); FIRE subtract / project / gated at a fixed layer; a random
  direction of beta's norm (control); input-transform baselines (ShrinkPad, JPEG, median, Gaussian);
- ablations: every repairable layer x mode; paired vs unpaired estimation; PA against the number of
  triggered calibration samples (offline: an independent draw of n; streaming: one running estimate
  updated sample by sample, read at n); one layer vs two (layer1 then layer2).

Calibration samples come from the training split, metrics from the test split. The repair runs in
process through the same torch head / repair / tail functions the served ensemble computes.

    fire bench efficacy            # or: python -m benchmarks.efficacy; writes results/efficacy*

Modules, one concern each: ``config`` (what to run), ``evaluate`` (the defenses on one model),
``report`` (CSV and markdown tables), ``plots`` (PNG figures), ``run`` (every model, cached per model).
"""

from benchmarks.efficacy.config import EfficacyConfig
from benchmarks.efficacy.rows import CSV_FIELDS
from benchmarks.efficacy.run import run_efficacy

__all__ = ["CSV_FIELDS", "EfficacyConfig", "run_efficacy"]
