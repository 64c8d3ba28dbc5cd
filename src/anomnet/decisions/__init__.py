"""From scores to decisions: thresholds, one verdict per image, and what sets them.

- :mod:`~anomnet.decisions.calibration`: the :class:`Calibration` record (thresholds, p-values, the verdict).
- :mod:`~anomnet.decisions.calibrate`: run a fitted detector over its calibration images; recalibrate a model.
- :mod:`~anomnet.decisions.operating_points`: asked rate, threshold and supported rate, in words.
- :mod:`~anomnet.decisions.postprocess`: the defect mask's clean-up (opening, closing, holes, small regions).
- :mod:`~anomnet.decisions.segsearch`: the pixel threshold and post-processing searched on labelled masks.
"""
