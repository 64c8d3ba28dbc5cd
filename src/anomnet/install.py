"""The install command to print in a hint: one that works in the install this anomnet runs from.

anomnet is not on a package index, so ``pip install 'anomnet[serve]'`` fails for most users. The
command names this Python (``sys.executable -m pip``, so the extra lands in the environment that runs
anomnet, whatever ``pip`` is first on the PATH) and where this anomnet came from:

* a checkout (an editable install, or ``src/`` on the path): ``pip install -e '<checkout>[extra]'``;
* a wheel file (``make wheel``): ``pip install '<that wheel>[extra]'`` (pip keeps the installed
  anomnet and adds the extra's packages);
* a non-editable install of a source folder: ``pip install '<that folder>[extra]'``;
* anything else (a package index of one's own): ``pip install 'anomnet[extra]'``.

The origin is read from the install's ``direct_url.json`` (PEP 610), which pip writes for every
install from a file, a folder or a checkout.
"""

from __future__ import annotations

import json
import shlex
import sys
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

PACKAGE_DIR = Path(__file__).resolve().parent


def _python() -> str:
    return shlex.quote(sys.executable or "python3")


def pip_command(*requirements: str) -> str:
    """``<this python> -m pip install <requirements>``, each requirement quoted for a POSIX shell."""
    return f"{_python()} -m pip install {' '.join(shlex.quote(r) for r in requirements)}"


def _checkout() -> Path | None:
    """The source checkout this anomnet is imported from (``<checkout>/src/anomnet``), if it is one."""
    root = PACKAGE_DIR.parent.parent
    if PACKAGE_DIR.parent.name == "src" and (root / "pyproject.toml").is_file():
        return root
    return None


def _origin() -> tuple[str, Path] | None:
    """``("wheel", file)`` or ``("folder", path)`` from the installed distribution's direct_url.json."""
    try:
        text = metadata.distribution("anomnet").read_text("direct_url.json")
        info = json.loads(text) if text else None
    except (metadata.PackageNotFoundError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    url = urlparse(str(info.get("url", "")))
    if url.scheme != "file":
        return None
    path = Path(unquote(url.path))
    if "archive_info" in info or path.suffix == ".whl":
        return "wheel", path
    return "folder", path


def install_command(extra: str) -> str:
    """The shell command that adds anomnet's optional ``extra`` (``serve``, ``runtime``, ...) to this install."""
    checkout = _checkout()
    if checkout is not None:
        return f"{_python()} -m pip install -e {shlex.quote(f'{checkout}[{extra}]')}"
    origin = _origin()
    if origin is not None:
        return pip_command(f"{origin[1]}[{extra}]")
    return pip_command(f"anomnet[{extra}]")
