"""requirements/lock.py, importable by the tests (it is a script, not part of the package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "requirements" / "lock.py"
_spec = importlib.util.spec_from_file_location("increment_service_lock", _PATH)
assert _spec is not None
assert _spec.loader is not None
_module = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _module
_spec.loader.exec_module(_module)

normalize = _module.normalize
pins = _module.pins
differences = _module.differences
installed = _module.installed
check_exports = _module.check_exports
requirement_name = _module.requirement_name
LOCK: Path = _module.LOCK
CONSTRAINTS: Path = _module.CONSTRAINTS
IMAGE: Path = _module.IMAGE
BUILD: Path = _module.BUILD
UNLOCKED: frozenset[str] = _module.UNLOCKED
