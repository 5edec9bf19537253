"""ScaNN's searcher API, imported without TensorFlow.

``import scann`` runs the package's ``__init__``, which imports TensorFlow whenever it is
installed (for ScaNN's TensorFlow ops, which lookalike does not use): 4-5 s on every
command that builds, loads or searches an index, and on every server start. What
lookalike uses, ``scann.scann_ops.py.scann_ops_pybind`` (the pybind11 searcher and its
builder), needs neither TensorFlow nor that ``__init__``. ``scann_ops_pybind`` imports it
with the ``scann`` package registered but its ``__init__`` not run, and gives the package
the names that ``__init__`` would (``scann_ops_pybind``, ``ScannBuilder``, ``ReorderType``),
so later code in the process that uses ``scann.scann_ops_pybind`` still works; only
``scann.scann_ops`` (the TensorFlow ops) then needs an explicit
``import scann.scann_ops.py.scann_ops``. A ``scann`` the process imported already is used
as it is.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from types import ModuleType

_PYBIND = "scann.scann_ops.py.scann_ops_pybind"
_lock = threading.Lock()


def scann_ops_pybind() -> ModuleType:
    """The ``scann_ops_pybind`` module (``.builder``, ``.load_searcher``, ``.scann_pybind``)."""
    module = sys.modules.get(_PYBIND)
    if module is not None:
        return module
    with _lock:
        if _PYBIND in sys.modules:
            return sys.modules[_PYBIND]
        package = sys.modules.get("scann")
        registered = package is None
        if registered:
            spec = importlib.util.find_spec("scann")
            if spec is None:
                raise ImportError("ScaNN is not installed: pip install scann")
            package = importlib.util.module_from_spec(spec)  # __path__ set, __init__ not run
            sys.modules["scann"] = package
        try:
            module = importlib.import_module(_PYBIND)
            builder = importlib.import_module("scann.scann_ops.py.scann_builder")
        except BaseException:
            if registered:
                sys.modules.pop("scann", None)
            raise
        for name, value in (("scann_ops_pybind", module), ("ScannBuilder", builder.ScannBuilder),
                            ("ReorderType", builder.ReorderType)):
            if not hasattr(package, name):
                setattr(package, name, value)
        return module
