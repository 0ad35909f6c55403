"""Optional dependencies (plots, progress bars, the tasks' libraries): a clear line when missing."""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRA = "dropsplit[cli]"


def require(
    module: str, purpose: str, extra: str = EXTRA, package: str | None = None
) -> ModuleType:
    """Import ``module`` or fail with one line that names the package to install.

    Args:
        module: The module to import.
        purpose: What needs it (the start of the error).
        extra: The extra of dropsplit that installs it.
        package: Its name on PyPI (default: the module's top-level name).

    Raises:
        ModuleNotFoundError: ``"<purpose> needs <package>: pip install 'dropsplit[cli]'"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = package or module.split(".")[0]
        raise ModuleNotFoundError(
            f"{purpose} needs {package}: pip install '{extra}' (or pip install {package})"
        ) from err
