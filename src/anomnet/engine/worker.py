"""The scorer each engine worker runs: one model per product, loaded once and kept, rows per batch.

:class:`BatchScorer` is a plain callable (Ray Data builds one per worker actor and calls it with
each batch of references), so it is tested without Ray. A batch's images are grouped by product and
scored with :func:`anomnet.predict.outputs.score_and_write`, the step ``predict`` uses: same rows, same
per-image files. It never raises for an input: an unreadable image, a model that cannot be loaded or a
scoring failure each become error rows and the batch goes on (after an unexpected failure the group's
images are scored one by one, so only the image that fails gets an error row); only the death of the
process itself (killed, out of memory) loses a batch, which the engine then runs again.

An image that kills every worker scoring it (a decoder crash, the out-of-memory killer) would make that a
retry loop: with an attempts folder (:class:`~anomnet.engine.rows.Attempts`) each input is marked while its
batch is scored; a batch that comes back with marks left (its worker died) is scored one image at a time,
each counted up before and cleared after, and an image whose scoring was under way :data:`MAX_ATTEMPTS`
times gets an error row instead of another try.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import pyarrow as pa

from anomnet.engine.models import model_for
from anomnet.engine.rows import Attempts, error_rows, refs_of, rows_table
from anomnet.errors import AnomnetError
from anomnet.predict.inputs import InputImage
from anomnet.predict.outputs import score_and_write
from anomnet.predict.scoring import DetectorScorer, Scorer, load_scorer

MAX_MODELS = 8
"""Models a worker keeps loaded at once (least recently used ones are dropped beyond this)."""
MAX_ATTEMPTS = 3
"""An input whose scoring was under way this many times when its worker died gets an error row, not another try."""


class BatchScorer:
    """Scores batches of references (an Arrow table of path, name, product) into result rows."""

    def __init__(
        self,
        models: Mapping[str | None, str | Scorer],
        out: str | None = None,
        raw_maps: bool = False,
        threads: int | None = None,
        max_models: int = MAX_MODELS,
        attempts: str | None = None,
    ) -> None:
        from anomnet.runtime import tune_allocator

        tune_allocator()
        self.models = dict(models)
        self.out = Path(out) if out is not None else None
        self.raw_maps = raw_maps
        self.threads = threads
        self.max_models = max(1, max_models)
        self.attempts = Attempts(attempts) if attempts is not None else None
        self._loaded: OrderedDict[str | None, Scorer] = OrderedDict()

    def scorer(self, product: str | None) -> Scorer:
        """The model of ``product``, loaded on first use and kept (at most ``max_models`` at once)."""
        key = product if product in self.models else None
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return self._loaded[key]
        model = model_for(self.models, product)
        if model is None:
            raise AnomnetError(f"no model for product {product!r}")
        scorer = load_scorer(model)  # type: ignore[arg-type]
        if isinstance(scorer, DetectorScorer) and self.threads:
            import torch

            torch.set_num_threads(self.threads)
        self._loaded[key] = scorer
        while len(self._loaded) > self.max_models:
            self._loaded.popitem(last=False)
        return scorer

    def __call__(self, batch: pa.Table) -> pa.Table:
        refs = refs_of(batch)
        if self.attempts is None:
            return self._score_refs(refs)
        tries = [self.attempts.get(r) for r in refs]
        if not any(tries):  # the usual case: marked while scored, unmarked once scored
            self.attempts.set(refs, 1)
            table = self._score_refs(refs)
            self.attempts.set(refs, 0)
            return table
        # a worker died while scoring this batch: each image alone, so only the one that kills is given up
        return pa.concat_tables([self._score_counted(ref, n) for ref, n in zip(refs, tries)])

    def _score_counted(self, ref: InputImage, tries: int) -> pa.Table:
        assert self.attempts is not None
        if tries >= MAX_ATTEMPTS:
            return error_rows(
                [ref],
                f"not scored: the worker scoring it died (killed, out of memory or crashed) {tries} times; "
                "it is not tried again",
            )
        self.attempts.set([ref], tries + 1)
        table = self._score_refs([ref])
        self.attempts.set([ref], 0)  # it returned: whatever stops the worker now is not this image's doing
        return table

    def _score_refs(self, refs: list[InputImage]) -> pa.Table:
        groups: dict[str | None, list[int]] = {}
        for i, ref in enumerate(refs):
            groups.setdefault(ref.product, []).append(i)
        parts: list[tuple[list[int], pa.Table]] = []
        for product, idx in groups.items():
            parts.append((idx, self._score_group(product, [refs[i] for i in idx])))
        order = [i for idx, _ in parts for i in idx]
        table = pa.concat_tables([t for _, t in parts])
        position = {i: k for k, i in enumerate(order)}
        return table.take(pa.array([position[i] for i in range(len(refs))], pa.int64()))

    def _score_group(self, product: str | None, refs: list[InputImage]) -> pa.Table:
        try:
            scorer = self.scorer(product)
        except AnomnetError as exc:
            return error_rows(refs, f"model could not be loaded: {exc}")
        except Exception as exc:  # e.g. a fitted model on a worker without the training stack (torch)
            return error_rows(refs, f"model could not be loaded: {type(exc).__name__}: {exc}")
        try:
            rows = score_and_write(scorer, refs, self.out, self.raw_maps)
        except Exception:  # an unexpected failure: score the images one by one, so only the culprit fails
            return pa.concat_tables([self._score_one(scorer, ref) for ref in refs])
        return rows_table(rows, [r.product for r in refs])

    def _score_one(self, scorer: Scorer, ref: InputImage) -> pa.Table:
        try:
            rows = score_and_write(scorer, [ref], self.out, self.raw_maps)
        except Exception as exc:  # one input must never stop the batch: it becomes an error row
            return error_rows([ref], f"could not be scored: {type(exc).__name__}: {exc}")
        return rows_table(rows, [ref.product])
