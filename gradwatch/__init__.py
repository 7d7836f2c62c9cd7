"""gradwatch: per-layer gradient monitoring, diagnosis and remedies for PyTorch training.

The public names are imported on first use (``gw.GradWatch`` loads the frontend, the engine and
torch), so ``import gradwatch`` alone is instant and ``gradwatch.engine`` can be imported without
any frontend or sink.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "AGC": "gradwatch.engine.remedies",
    "Alert": "gradwatch.engine.alerts",
    "AlertKind": "gradwatch.engine.alerts",
    "AuditReport": "gradwatch.preflight",
    "AutoClip": "gradwatch.engine.remedies",
    "ClipNorm": "gradwatch.engine.remedies",
    "DeadUnitsDetector": "gradwatch.engine.detectors",
    "Detector": "gradwatch.engine.detectors",
    "ExplodingDetector": "gradwatch.engine.detectors",
    "ExplodingProfileDetector": "gradwatch.engine.detectors",
    "GradWatch": "gradwatch.watch",
    "GradientError": "gradwatch.engine.alerts",
    "LRBackoff": "gradwatch.engine.remedies",
    "LoggerMetricsSink": "gradwatch.sinks.metrics",
    "MlflowSink": "gradwatch.sinks.mlflow",
    "NonFiniteDetector": "gradwatch.engine.detectors",
    "NormGrowthDetector": "gradwatch.engine.detectors",
    "Origin": "gradwatch.engine.origin",
    "Remedy": "gradwatch.engine.remedies",
    "SaturationDetector": "gradwatch.engine.detectors",
    "Sink": "gradwatch.sinks.base",
    "SkipStep": "gradwatch.engine.remedies",
    "SpikeDetector": "gradwatch.engine.detectors",
    "StagnationDetector": "gradwatch.engine.detectors",
    "StepReport": "gradwatch.engine.observation",
    "TensorBoardSink": "gradwatch.sinks.tensorboard",
    "VanishingDetector": "gradwatch.engine.detectors",
    "ZeroGradientDetector": "gradwatch.engine.detectors",
    "WandbSink": "gradwatch.sinks.wandb",
    "WatchConfig": "gradwatch.engine.config",
    "ZClip": "gradwatch.engine.remedies",
    "audit": "gradwatch.preflight",
}

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
    "ExplodingProfileDetector",
    "GradWatch",
    "GradientError",
    "LRBackoff",
    "LoggerMetricsSink",
    "MlflowSink",
    "NonFiniteDetector",
    "NormGrowthDetector",
    "Origin",
    "Remedy",
    "SaturationDetector",
    "Sink",
    "SkipStep",
    "SpikeDetector",
    "StagnationDetector",
    "StepReport",
    "TensorBoardSink",
    "VanishingDetector",
    "WandbSink",
    "WatchConfig",
    "ZClip",
    "ZeroGradientDetector",
    "__version__",
    "audit",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:
    from gradwatch.engine.alerts import Alert, AlertKind, GradientError
    from gradwatch.engine.config import WatchConfig
    from gradwatch.engine.detectors import (
        DeadUnitsDetector,
        Detector,
        ExplodingDetector,
        ExplodingProfileDetector,
        NonFiniteDetector,
        NormGrowthDetector,
        SaturationDetector,
        SpikeDetector,
        StagnationDetector,
        VanishingDetector,
        ZeroGradientDetector,
    )
    from gradwatch.engine.observation import StepReport
    from gradwatch.engine.origin import Origin
    from gradwatch.engine.remedies import (
        AGC,
        AutoClip,
        ClipNorm,
        LRBackoff,
        Remedy,
        SkipStep,
        ZClip,
    )
    from gradwatch.preflight import AuditReport, audit
    from gradwatch.sinks.base import Sink
    from gradwatch.sinks.metrics import LoggerMetricsSink
    from gradwatch.sinks.mlflow import MlflowSink
    from gradwatch.sinks.tensorboard import TensorBoardSink
    from gradwatch.sinks.wandb import WandbSink
    from gradwatch.watch import GradWatch
