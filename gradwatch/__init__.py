"""gradwatch: per-layer gradient monitoring, diagnosis and remedies for PyTorch training."""

from gradwatch.alerts import Alert, AlertKind, GradientError
from gradwatch.audit import AuditReport, audit
from gradwatch.detectors import (
    DeadUnitsDetector,
    Detector,
    ExplodingDetector,
    NonFiniteDetector,
    SaturationDetector,
    SpikeDetector,
    StagnationDetector,
    VanishingDetector,
)
from gradwatch.remedies import AGC, AutoClip, ClipNorm, LRBackoff, Remedy, SkipStep, ZClip
from gradwatch.sinks.metrics import LoggerMetricsSink
from gradwatch.sinks.tensorboard import TensorBoardSink
from gradwatch.step import StepReport
from gradwatch.watch import GradWatch

__version__ = "0.1.0"

__all__ = [
    "AGC",
    "Alert",
    "AlertKind",
    "AuditReport",
    "AutoClip",
    "ClipNorm",
    "DeadUnitsDetector",
    "Detector",
    "ExplodingDetector",
    "GradWatch",
    "GradientError",
    "LRBackoff",
    "LoggerMetricsSink",
    "NonFiniteDetector",
    "Remedy",
    "SaturationDetector",
    "SkipStep",
    "SpikeDetector",
    "StagnationDetector",
    "StepReport",
    "TensorBoardSink",
    "VanishingDetector",
    "ZClip",
    "__version__",
    "audit",
]
