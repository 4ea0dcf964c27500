"""Offline estimation of FIRE's backdoor directions (paired, unpaired) and the direction file writer."""

from calibration.calibrate import CalibrationConfig, HeadFeatures, calibrate, calibrate_second
from calibration.estimators import RunningMean, paired_direction, unpaired_direction

__all__ = [
    "CalibrationConfig",
    "HeadFeatures",
    "RunningMean",
    "calibrate",
    "calibrate_second",
    "paired_direction",
    "unpaired_direction",
]
