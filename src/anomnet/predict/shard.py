"""``predict --shard i/N``: a deterministic split of the input list, so N plain jobs cover it once.

Shard ``i`` (counted from 0) of ``N`` takes the inputs at positions ``i, i + N, i + 2N, ...`` of the
expanded input list *sorted by path*: the split never depends on the order in which a file system lists
a folder, every input lands in exactly one shard, and the shards differ in size by at most one image.
Output names (heat maps, masks) are those of the whole list, so the shards' outputs can share a folder
tree without colliding.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from anomnet.errors import ConfigError


class _Named(Protocol):
    @property
    def path(self) -> Path | str: ...

    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=_Named)

_SPEC = re.compile(r"^\s*(-?\d+)\s*/\s*(-?\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (``0 <= index < count``)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ConfigError(f"--shard {self.index}/{self.count}: the number of shards must be at least 1")
        if not 0 <= self.index < self.count:
            raise ConfigError(
                f"--shard {self.index}/{self.count}: the shard index must be between 0 and {self.count - 1} "
                "(shards are counted from 0)"
            )

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"i/N"`` -> ``Shard(i, N)``; anything else is a :class:`ConfigError` that names the value."""
        match = _SPEC.match(text)
        if match is None:
            raise ConfigError(f"--shard {text!r}: expected i/N, e.g. 0/4 for the first of four shards")
        return cls(int(match.group(1)), int(match.group(2)))

    def select(self, items: Sequence[T]) -> list[T]:
        """This shard's items, in their given order (membership decided on the path-sorted list)."""
        order = sorted(range(len(items)), key=lambda i: (str(items[i].path), items[i].name))
        mine = {pos for rank, pos in enumerate(order) if rank % self.count == self.index}
        return [item for pos, item in enumerate(items) if pos in mine]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"
