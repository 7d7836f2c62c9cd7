"""Runtime problems become one warning each: the training loop goes on."""

from __future__ import annotations

import warnings


class WarnOnce:
    """Issues each warning (by key) at most once per owner.

    Example:
        >>> warn = WarnOnce()
        >>> warn("loss", "the loss is not usable")  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, key: str, message: str, *, stacklevel: int = 3) -> None:
        """Warns with ``message`` (a ``RuntimeWarning``) unless ``key`` warned already."""
        if key not in self._seen:
            self._seen.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)
