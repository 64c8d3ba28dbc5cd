"""The drivers of BENCHMARKS.md: each section's exact `anomnet bench` arguments, one command per section.

Run from anywhere (paths are taken relative to this repository, never to the working directory)::

    python benchmarks/sections.py patchcore-anomnet        # the headline section (`make bench`)
    python benchmarks/sections.py postprocessing            # runs benchmarks/postprocess_study.py
    python benchmarks/sections.py tiling --dry-run          # print the command only

Each writes its JSON to ``benchmarks/NAME.json`` and replaces only its own section of ``BENCHMARKS.md``.
Rows whose settings are not given run with the defaults of the day (the efficientad section was measured with
the defaults of its time; its note in BENCHMARKS.md says which).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOTTLE = ROOT.parent / "shared" / "datasets" / "mvtec_ad" / "bottle"

ANOMNET_ABLATION = [
    # the paper's Table 1: attraction is on in every row
    "a:model=anomnet;stages=1;use_att=true;use_sep=true;use_ent=true;use_con=false",
    "b:model=anomnet;stages=1;use_att=true;use_sep=true;use_ent=true;use_con=true",
    "c:model=anomnet;use_sep=false;use_ent=false;use_con=false",
    "d:model=anomnet;use_sep=false;use_ent=true;use_con=false",
    "e:model=anomnet;use_sep=true;use_ent=false;use_con=false",
    "f:model=anomnet;use_sep=true;use_ent=true;use_con=false",
    # (c)-(f) again from the paper's mean initialisation (k-means already spreads the centroids)
    "c-mean:model=anomnet;centroid_init=mean;use_sep=false;use_ent=false;use_con=false",
    "d-mean:model=anomnet;centroid_init=mean;use_sep=false;use_ent=true;use_con=false",
    "e-mean:model=anomnet;centroid_init=mean;use_sep=true;use_ent=false;use_con=false",
    "f-mean:model=anomnet;centroid_init=mean;use_sep=true;use_ent=true;use_con=false",
    "lambda-0:model=anomnet;lambda_con=0",
    "lambda-0.2:model=anomnet;lambda_con=0.2",
    "lambda-2:model=anomnet;lambda_con=2",
    "lambda-8:model=anomnet;lambda_con=8",
    "no-training:model=anomnet;epochs1=0;epochs2=0",
    "stress-residual:model=anomnet;stages=1;use_sep=false;use_ent=false;use_con=false;lr=1e-2;epochs1=60",
    "stress-plain:model=anomnet;adapter=plain;stages=1;use_sep=false;use_ent=false;use_con=false;lr=1e-2;epochs1=60",
]


def _variants(items: list[str]) -> list[str]:
    return [a for v in items for a in ("--variant", v)]


# section -> (models, variants, extra arguments); "{runs}" is the repository's runs/ folder
SECTIONS: dict[str, tuple[str, list[str], list[str]]] = {
    "patchcore-anomnet": ("patchcore,anomnet", ANOMNET_ABLATION, ["--memory-images", "1000"]),
    "efficientad": (
        "patchcore",
        [
            "s-cdo:model=efficientad;cache_dir={runs}/bench-ead/cache",
            "s-original:model=efficientad;loss=original;cache_dir={runs}/bench-ead/cache",
            "s-cdo-backbone-teacher:model=efficientad;teacher=backbone",
            "m-cdo-equal-time:model=efficientad;model_size=m;steps=65;distill_steps=60;cache_dir={runs}/bench-ead/cache",
            "m-original-equal-time:model=efficientad;model_size=m;steps=65;distill_steps=60;loss=original;"
            "cache_dir={runs}/bench-ead/cache",
        ],
        ["--work-dir", "{runs}/bench-ead", "--rescore", "alpha=0", "--rescore", "alpha=1"],
    ),
    "anomnet-choices": (
        "anomnet",
        [
            "K-64:num_centroids=64",
            "K-256:num_centroids=256",
            "layers-stage3-4:layers=stage3,stage4",
            "layers-stage2-5:layers=stage2,stage3,stage4,stage5",
            "init-mean:centroid_init=mean",
            "entropy-logdet:entropy=logdet",
            "paper-lr:lr=1e-4",
            "adapter-plain:adapter=plain",
            "paper-crop:crop=224",
        ],
        [],
    ),
    "tocoad": (
        "patchcore,tocoad",
        [  # the default trains nothing (docs/tocoad.md); these name the stages they train
            "stages-1-2:model=tocoad;stage2=true",
            "stage1-only:model=tocoad;stage1=true",
            "stage2-only:model=tocoad;stage1=false;stage2=true",
        ],
        ["--work-dir", "{runs}/bench-tocoad"],
    ),
    "tiling": (
        "",
        [
            "resize-256:model=patchcore",
            "resize-256-1pct:model=patchcore;coreset_ratio=0.01",
            "tiled-512:model=patchcore;tile=512;coreset_ratio=0.01",
            "tiled-256:model=patchcore;tile=256;coreset_ratio=0.01",
            "tiled-256-pyramid:model=patchcore;tile=256;tile_scales=1,0.5;coreset_ratio=0.01",
        ],
        ["--work-dir", "{runs}/bench-tiling"],
    ),
    "tocoad-variants": (
        "",
        ["lr2-0.001:model=tocoad;stage2=true;lr2=0.001", "lambda-0.2:model=tocoad;stage2=true;lambda_sym=0.2"],
        ["--work-dir", "{runs}/bench-tocoad-var"],
    ),
    "efficientad-budget": (
        "",
        [
            "s-cdo-backbone-teacher-400-steps:model=efficientad;teacher=backbone;steps=400",
            "s-cdo-backbone-teacher-100-steps:model=efficientad;teacher=backbone;steps=100",
        ],
        ["--work-dir", "{runs}/bench-ead-budget"],
    ),
    "efficientad-budget-800": (
        "",
        ["s-cdo-backbone-teacher-800-steps:model=efficientad;teacher=backbone;steps=800"],
        ["--work-dir", "{runs}/bench-ead-budget"],
    ),
}
STUDIES = {"postprocessing": ("patchcore,anomnet", ["--work-dir", "{runs}/bench-pp"])}


def arguments(section: str, data: str, markdown: Path, json_dir: Path, runs: Path) -> list[str]:
    """The argument list (after ``anomnet bench`` or the study script) that produces ``section``."""
    outputs = ["--out", str(json_dir / f"{section}.json"), "--markdown", str(markdown), "--section", section]
    if section in STUDIES:
        models, extra = STUDIES[section]
        args = ["--data", data, "--models", models, *extra, *outputs]
    else:
        models, variants, extra = SECTIONS[section]
        args = ["--data", data, "--models", models, *_variants(variants), *extra, *outputs]
    return [a.replace("{runs}", str(runs)) for a in args]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Produce one section of BENCHMARKS.md (and benchmarks/NAME.json).")
    p.add_argument("section", choices=sorted([*SECTIONS, *STUDIES]), help="the section to (re)measure")
    p.add_argument("--data", default=str(BOTTLE), help=f"dataset (default {BOTTLE})")
    p.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"), help="Markdown file (default the repository's)")
    p.add_argument("--json-dir", default=str(ROOT / "benchmarks"), help="folder for NAME.json (default benchmarks/)")
    p.add_argument(
        "--runs", default=str(ROOT / "runs"), help="folder for fitted models (default the repository's runs/)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    args = arguments(a.section, a.data, Path(a.markdown), Path(a.json_dir), Path(a.runs))
    if a.section in STUDIES:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import postprocess_study

        if a.dry_run:
            print(" ".join(["python", str(Path(postprocess_study.__file__)), *map(shlex.quote, args)]))
            return 0
        return postprocess_study.main(args)
    if a.dry_run:
        print(" ".join(["anomnet", "bench", *map(shlex.quote, args)]))
        return 0
    from anomnet.cli import main as cli_main

    return cli_main(["bench", *args])


if __name__ == "__main__":
    sys.exit(main())
