"""PatchCore trains no loss: ``fit`` extracts features and subsamples them (greedy coreset).

Its scoring, the nearest-bank-patch distance and the re-weighted image score (paper eq. 7),
lives in :mod:`anomnet.detectors.patchcore.model`.
"""
