"""Framework integrations, one module per framework, each imported only when used.

- :mod:`gradwatch.integrations.transformers`: ``GradWatchCallback``, a Hugging Face
  ``transformers.TrainerCallback``.

Accelerate needs no module of its own: ``gw.GradWatch`` takes the prepared model and the
``AcceleratedOptimizer`` as they are. Lightning's callback is :mod:`gradwatch.lightning`.
"""
