"""Offline estimation of FIRE's backdoor directions (paired, unpaired) and the direction file writer."""

from calibration.calibrate import CalibrationConfig, HeadFeatures, calibrate
from calibration.estimators import RunningMean, paired_direction, unpaired_direction

__all__ = ["CalibrationConfig", "HeadFeatures", "RunningMean", "calibrate", "paired_direction", "unpaired_direction"]
