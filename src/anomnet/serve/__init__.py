"""The inspection service and its review page (``anomnet serve``; needs the ``serve`` extra).

* :mod:`anomnet.serve.app` -- the FastAPI app (FastAPI is imported when an app is made: ``anomnet[serve]``).
* :mod:`anomnet.serve.limits` -- upload, pixel, path, pool and key limits (no FastAPI needed).
* :mod:`anomnet.serve.metrics` -- request counts and the latency histogram, Prometheus text.
* :mod:`anomnet.serve.review` -- the operator's marks, saved as a labelled validation folder.
* ``static/`` -- the review page (plain HTML, CSS and JavaScript, every asset local).

Importing this package imports none of them.
"""

from __future__ import annotations

from anomnet.install import install_command

MISSING_EXTRA = (
    f"the inspection service needs the serve extra: {install_command('serve')} (fastapi, uvicorn, python-multipart)"
)


def missing_extra() -> str | None:
    """None when the serve extra is installed, else what to install."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "multipart") if importlib.util.find_spec(m) is None]
    return f"{MISSING_EXTRA}; missing: {', '.join(missing)}" if missing else None
