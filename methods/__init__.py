"""Attribution methods behind one registry (see ``methods.registry`` and DESIGN.md).

Importing this package imports no method implementation: ``get_method("kfac")`` imports the
K-FAC module on first use, so ``--method kfac`` never imports CLIP.
"""

from methods.base import AttributionMethod, MethodUnavailableError, NoConfig
from methods.context import MethodContext
from methods.registry import (
    ENTRY_POINT_GROUP,
    DuplicateMethodError,
    MethodEntry,
    UnknownMethodError,
    available_methods,
    create_method,
    default_dampings,
    get_method,
    methods_in_table_order,
    register_method,
    similarity_baselines,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "AttributionMethod",
    "DuplicateMethodError",
    "MethodContext",
    "MethodEntry",
    "MethodUnavailableError",
    "NoConfig",
    "UnknownMethodError",
    "available_methods",
    "create_method",
    "default_dampings",
    "get_method",
    "methods_in_table_order",
    "register_method",
    "similarity_baselines",
]
