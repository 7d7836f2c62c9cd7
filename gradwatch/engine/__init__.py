"""The engine: per-layer gradient statistics, detectors, remedies and alerts.

Imports ``torch`` and ``numpy`` only: never a frontend, a sink, Lightning, Transformers or
TensorBoard. Frontends (``gradwatch.watch``, ``gradwatch.lightning``, ``gradwatch.integrations``)
build a :class:`WatchConfig` and drive an :class:`Engine`; sinks read its records.
"""

from gradwatch.engine.alerts import Alert, AlertKind, GradientError
from gradwatch.engine.config import WatchConfig
from gradwatch.engine.detectors import Detector
from gradwatch.engine.engine import Engine, StepOutcome
from gradwatch.engine.observation import Decision, Detection, Observation, RemedyInput, StepReport
from gradwatch.engine.records import FlushRecord
from gradwatch.engine.remedies import Remedy

__all__ = [
    "Alert",
    "AlertKind",
    "Decision",
    "Detection",
    "Detector",
    "Engine",
    "FlushRecord",
    "GradientError",
    "Observation",
    "Remedy",
    "RemedyInput",
    "StepOutcome",
    "StepReport",
    "WatchConfig",
]
