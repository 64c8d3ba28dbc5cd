"""Model export (``anomnet export``): a fitted model as one ONNX, OpenVINO or TorchScript graph.

:mod:`.geometry` (preprocessing and map restoring as sampling tables), :mod:`.graph` (the traced
module: uint8 images -> scores, maps, decisions), :mod:`.writer` (formats, verification, the
folder). Reading and running an exported folder needs none of this: :mod:`anomnet.exported`.
See docs/export.md.
"""

from anomnet.export.writer import export_model, graph_reference, probe_images

__all__ = ["export_model", "graph_reference", "probe_images"]
