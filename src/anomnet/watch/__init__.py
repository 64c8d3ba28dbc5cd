"""The hot folder (``anomnet watch``): score each image a camera station drops into an inbox folder, exactly once.

* :mod:`anomnet.watch.inbox` - which files are candidates, and when each is completely written;
* :mod:`anomnet.watch.journal` - results.jsonl / results.csv appended durably, the state file, crash recovery;
* :mod:`anomnet.watch.moves` - moving a processed file away without replacing anything;
* :mod:`anomnet.watch.folder` - the loop tying them together (:class:`HotFolder`, :func:`watch`).

Nothing here imports torch: an exported model folder is watched on a machine without it.
"""

from anomnet.watch.folder import HotFolder, WatchOptions, WatchSummary, print_log, watch
from anomnet.watch.journal import WatchError

__all__ = ["HotFolder", "WatchError", "WatchOptions", "WatchSummary", "print_log", "watch"]
