"""Graph mode: compute the way an exported model (``anomnet export``) does, in eager torch too.

While torch traces a model for export, or inside :func:`graph_mode`, the building blocks take
their graph path: nearest-neighbour and nearest-centroid search are exact plain torch (no faiss,
no IVF cells) and never loop over a count that depends on the batch, and nothing runs in
bfloat16. A detector's prediction inside ``graph_mode()`` is therefore exactly what its exported
graph computes, and it is the reference the exported model is tested against (docs/export.md).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("anomnet_graph_mode", default=False)


def graph_mode_active() -> bool:
    """True inside :func:`graph_mode` and while torch traces a model (``torch.jit.trace``, ONNX export)."""
    return _ACTIVE.get() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


@contextlib.contextmanager
def graph_mode() -> Iterator[None]:
    """Run the enclosed predictions the way the exported graph computes them."""
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
