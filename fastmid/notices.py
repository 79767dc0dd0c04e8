"""Log notices of optional backends that concern no fastmid user, filtered out once.

transformers imports torchao whenever it is installed, even for a model nobody quantizes. On a
CPU-only torch torchao then logs a "Failed to load ....so" warning per CUDA extension, and torch
a deprecation notice per enum torchao registers. :func:`install` (run by ``import fastmid``)
drops exactly those records with logging filters; every other message of those loggers shows.
"""

from __future__ import annotations

import logging


def _not_extension_notice(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not (message.startswith("Failed to load ") and ".so" in message)


def _not_enum_notice(record: logging.LogRecord) -> bool:
    return "register_constant() on Enum subclasses is deprecated" not in record.getMessage()


_FILTERS = {"torchao": _not_extension_notice, "torch.utils._pytree": _not_enum_notice}


def install() -> None:
    """Add the filters (once; adding them again changes nothing)."""
    for name, keep in _FILTERS.items():
        logger = logging.getLogger(name)
        if keep not in logger.filters:
            logger.addFilter(keep)
