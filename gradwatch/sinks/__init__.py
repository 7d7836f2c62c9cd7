"""Sinks: where flush records go (TensorBoard, framework loggers)."""

from gradwatch.sinks.base import Sink

__all__ = ["Sink"]
