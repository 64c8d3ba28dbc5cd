"""Measuring a detector on a labelled test set: metrics, the evaluation path and the report.

- :mod:`~anomnet.evaluation.metrics`: AUROC, F1, AU-PRO and friends, in NumPy.
- :mod:`~anomnet.evaluation.evaluate`: the one evaluation path (scores, maps, thresholds -> metrics).
- :mod:`~anomnet.evaluation.report`: the HTML report.
"""
