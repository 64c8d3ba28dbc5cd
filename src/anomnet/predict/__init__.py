"""From images to result rows and files: what ``anomnet predict``, the service and the engines share.

- :mod:`~anomnet.predict.inputs`: the images a run scores and their unique output names.
- :mod:`~anomnet.predict.shard`: ``--shard i/N``, a deterministic split of the inputs.
- :mod:`~anomnet.predict.scoring`: one pure function from a model and image references to rows.
- :mod:`~anomnet.predict.outputs`: the rows' files (CSV, JSON, heat maps, overlays, masks), written beside scoring.
- :mod:`~anomnet.predict.visualize`: heat-map colours, overlays and the colour scale.
- :mod:`~anomnet.predict.submission`: benchmark-submission files (e.g. MVTec AD 2's).
"""
