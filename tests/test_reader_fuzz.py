"""Seeded fuzzing of the image reader: hundreds of mutants of small files of every supported kind.

Runs in a child process under an address-space limit and a time limit. Every mutant must
either decode to a float RGB array within the reader's bounds or be refused with an
:class:`~anomnet.errors.ImageReadError`; any other exception, a hang or a memory blow-up fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
MUTANTS = 400
MEMORY_LIMIT = 2 << 30  # bytes of address space for the child (the bombs inflate to 64 MB at most)
PER_FILE_S = 5.0
PEAK_GROWTH_MB = 40

CHILD = """
import json, resource, sys, time, traceback
from pathlib import Path
import numpy as np
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
from hostile_images import mutate, seed_files
from anomnet import imageio
from anomnet.errors import ImageReadError

folder = Path({folder!r})
seed_paths = seed_files(folder / "seeds")
seeds = [(p.suffix, p.read_bytes()) for p in seed_paths]
problems, slowest = [], 0.0
for p in seed_paths:  # every unmutated seed is a valid file and must read
    try:
        imageio.read_image(p)
    except ImageReadError as exc:
        problems.append(f"seed {{p.name}} refused: {{exc}}")
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rng = np.random.default_rng(21)
counts = {{"read": 0, "refused": 0}}
for n in range({mutants}):
    suffix, data = seeds[n % len(seeds)]
    path = folder / f"m{{n:04d}}{{suffix}}"
    path.write_bytes(mutate(data, rng))
    t = time.perf_counter()
    try:
        image = imageio.read_image(path)
        h, w = image.shape[:2]
        ok = (
            image.dtype == np.float32 and image.ndim == 3 and image.shape[2] == 3
            and 0 < h * w <= imageio.MAX_IMAGE_PIXELS and max(h, w) <= imageio.MAX_ASPECT_RATIO * min(h, w)
            and bool(np.isfinite(image).all()) and float(image.min()) >= 0.0 and float(image.max()) <= 1.0
        )
        counts["read"] += 1
        if not ok:
            problems.append(f"{{path.name}}: out-of-bounds result {{image.dtype}} {{image.shape}}")
    except ImageReadError as exc:
        counts["refused"] += 1
        if exc.path != path or str(path) not in str(exc):
            problems.append(f"{{path.name}}: error does not name the file: {{exc}}")
    except BaseException as exc:
        problems.append(f"{{path.name}}: {{type(exc).__name__}}: {{exc}}\\n{{traceback.format_exc()[-600:]}}")
    elapsed = time.perf_counter() - t
    slowest = max(slowest, elapsed)
    if elapsed > {per_file}:
        problems.append(f"{{path.name}}: took {{elapsed:.1f}} s")
    path.unlink()
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024
print(json.dumps({{"counts": counts, "problems": problems, "slowest_s": slowest, "peak_growth_mb": grown}}))
"""


def test_reader_fuzz(tmp_path: Path) -> None:
    code = CHILD.format(limit=MEMORY_LIMIT, folder=str(tmp_path), mutants=MUTANTS, per_file=PER_FILE_S)
    env = {"PYTHONPATH": f"{SRC}:{TESTS}", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=180, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["problems"] == [], "\n".join(result["problems"][:20])
    assert result["counts"]["read"] + result["counts"]["refused"] == MUTANTS
    assert result["counts"]["read"] > 0 and result["counts"]["refused"] > 0
    assert result["peak_growth_mb"] < PEAK_GROWTH_MB, result  # a bomb of up to 64 MB inflated nowhere
