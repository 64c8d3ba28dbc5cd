"""Measuring a detector on a labelled test set: metrics, the evaluation path, the report and benchmarks.

- :mod:`~anomnet.evaluation.metrics`: AUROC, F1, AU-PRO and friends, in NumPy.
- :mod:`~anomnet.evaluation.evaluate`: the one evaluation path (scores, maps, thresholds -> metrics).
- :mod:`~anomnet.evaluation.report`: the HTML report.
- :mod:`~anomnet.evaluation.bench`: ``anomnet bench`` and the helpers benchmark scripts share.
"""
