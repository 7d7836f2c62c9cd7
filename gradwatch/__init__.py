"""gradwatch: per-layer gradient monitoring, diagnosis and remedies for PyTorch training."""

from gradwatch.alerts import Alert, AlertKind, GradientError
from gradwatch.detectors import Detector
from gradwatch.remedies import Remedy
from gradwatch.step import StepReport
from gradwatch.watch import GradWatch

__version__ = "0.1.0"

__all__ = [
    "Alert",
    "AlertKind",
    "Detector",
    "GradWatch",
    "GradientError",
    "Remedy",
    "StepReport",
    "__version__",
]
