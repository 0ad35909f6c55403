"""Optional dependencies of the command line (plots, progress bars): a clear line when missing."""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRA = "dropsplit[cli]"


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or fail with one line that names the package to install.

    Raises:
        ModuleNotFoundError: ``"<purpose> needs <package>: pip install 'dropsplit[cli]'"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = module.split(".")[0]
        raise ModuleNotFoundError(
            f"{purpose} needs {package}: pip install '{EXTRA}' (or pip install {package})"
        ) from err
