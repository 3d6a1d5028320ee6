"""The cachetools adapters on more than one cachetools: the installed one, and the oldest
supported release, side-loaded from a wheel kept in ``tests/cachetools_wheels``.

A test that takes the ``flavour`` fixture of a module (``@pytest.fixture(params=FLAVOURS)``
returning :func:`flavour`) runs once per cachetools: it reaches the library through
``flavour.cachetools`` and the adapters through ``flavour.adapters``. The side-loaded
adapters are a second import of ``adapters/cachetools.py`` whose ``import cachetools`` found
the old release, so they run the very code users run on it (its import-time checks too).

The wheel is in the repository because tests only talk to loopback: nothing is downloaded.
The installed cachetools is the newest release that ``pyproject.toml`` allows, as the
virtualenv resolves it; 5.3.0 is the oldest it allows (the adapters' ``SUPPORTED_VERSIONS``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import cachetools

import handoff.adapters.cachetools as installed_adapters

__all__ = ("FLAVOURS", "OLDEST", "Flavour", "flavour")

WHEELS = Path(__file__).resolve().parent / "cachetools_wheels"
OLDEST = "5.3.0"
FLAVOURS = ("installed", OLDEST)
"""Parameters for a ``flavour`` fixture: the installed cachetools, then the oldest."""


@dataclass(frozen=True, repr=False)
class Flavour:
    """One cachetools release and the adapters imported against it."""

    version: str
    cachetools: Any
    adapters: Any

    def __repr__(self) -> str:
        return f"<cachetools {self.version}>"


def flavour(name: str) -> Flavour:
    """``"installed"``, or a version whose wheel is in ``tests/cachetools_wheels``."""
    if name == "installed":
        return Flavour(cachetools.__version__, cachetools, installed_adapters)
    return _side_loaded(name)


def _is_cachetools(module_name: str) -> bool:
    return module_name == "cachetools" or module_name.startswith("cachetools.")


@functools.cache
def _side_loaded(version: str) -> Flavour:
    wheel = WHEELS / f"cachetools-{version}-py3-none-any.whl"
    if not wheel.is_file():
        raise FileNotFoundError(f"no wheel for cachetools {version} in {WHEELS}")
    # The installed cachetools leaves sys.modules for the duration of the import only, so
    # that `import cachetools` in both modules below finds the wheel (a pure-Python wheel
    # imports straight from its zip file); everything else keeps the installed one.
    saved = {name: module for name, module in sys.modules.items() if _is_cachetools(name)}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(wheel))
    try:
        old = importlib.import_module("cachetools")
        name = "_handoff_adapters_cachetools_" + version.replace(".", "_")
        spec = importlib.util.spec_from_file_location(name, installed_adapters.__file__)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {installed_adapters.__file__}")
        adapters: ModuleType = importlib.util.module_from_spec(spec)
        sys.modules[name] = adapters
        try:
            spec.loader.exec_module(adapters)
        except BaseException:
            del sys.modules[name]
            raise
    finally:
        sys.path.remove(str(wheel))
        for name in [name for name in sys.modules if _is_cachetools(name)]:
            del sys.modules[name]
        sys.modules.update(saved)
    if old.__version__ != version or adapters.cachetools is not old:
        raise ImportError(f"side-loading cachetools {version} found {old.__version__}")
    return Flavour(version, old, adapters)
