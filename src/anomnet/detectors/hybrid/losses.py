"""The hybrid trains no loss of its own: its branches train theirs in their own ``fit``.

What it optimises is a choice, not a loss: the branch (or the fused map) with the best
``criterion`` on selection data the test set never touches
(:mod:`anomnet.detectors.hybrid.selection`).
"""
