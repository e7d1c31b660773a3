"""In-context segmenters behind one interface, created by name.

``create("patch")``, ``create("atlas")`` and ``create("universeg", weights=...)``
return an :class:`InContextSegmenter`. The weight-free ones need nothing but
this package; UniverSeg needs its official weights file.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from spe.errors import SPEError
from spe.segmenters.base import InContextSegmenter, PreparedImages

# name -> (module, class); imported lazily so a missing optional part of one
# segmenter never breaks the others.
_REGISTRY = {
    "patch": ("spe.segmenters.patch", "PatchFusionSegmenter"),
    "atlas": ("spe.segmenters.atlas", "AtlasSegmenter"),
    "universeg": ("spe.segmenters.universeg", "UniverSegSegmenter"),
}

SEGMENTER_NAMES = tuple(_REGISTRY)


def create(name: str, **options: Any) -> InContextSegmenter:
    """An in-context segmenter by name, with its options as keywords."""
    if name not in _REGISTRY:
        message = (
            f"unknown segmenter {name!r}; choose one of {', '.join(SEGMENTER_NAMES)}"
        )
        raise SPEError(message)
    module_name, class_name = _REGISTRY[name]
    segmenter_class = getattr(importlib.import_module(module_name), class_name)
    return segmenter_class(**options)


def create_from_record(
    name: str, settings: dict[str, Any], **runtime: Any
) -> InContextSegmenter:
    """A segmenter rebuilt from recorded ``settings()`` plus run-time options.

    Recorded keys that are not constructor options (such as a weights
    checksum) are left out; the segmenter recomputes them, and a calibration
    check compares them afterwards. Lists become tuples (JSON has no tuples).
    """
    if name not in _REGISTRY:
        create(name)  # raises the error naming the known segmenters
    module_name, class_name = _REGISTRY[name]
    segmenter_class = getattr(importlib.import_module(module_name), class_name)
    accepted = inspect.signature(segmenter_class.__init__).parameters
    options = {
        key: tuple(value) if isinstance(value, list) else value
        for key, value in settings.items()
        if key in accepted
    }
    try:
        return segmenter_class(**options | runtime)
    except (TypeError, ValueError) as error:
        message = f"the recorded {name} settings are invalid ({error}); recalibrate"
        raise SPEError(message) from error


__all__ = [
    "SEGMENTER_NAMES",
    "InContextSegmenter",
    "PreparedImages",
    "create",
    "create_from_record",
]
