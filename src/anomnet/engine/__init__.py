"""Scoring past one process: shards for plain job schedulers, and a Ray engine for clusters.

- :mod:`anomnet.predict.shard`: ``predict --shard i/N``, a deterministic split of the input list.
- :mod:`anomnet.engine.models`: the model of each product of a batch run.
- :mod:`anomnet.engine.rows`: result rows as a table, their journal, resume and the final files.
- :mod:`anomnet.engine.worker`: the scorer each engine worker runs (one model per product, loaded once).
- :mod:`anomnet.engine.ray_predict`: ``predict --engine ray`` on Ray Data.

Only ``shard`` is needed by a plain ``predict``; the rest needs the ``anomnet[ray]`` extra
(pyarrow, Ray Data), imported when used.
"""
