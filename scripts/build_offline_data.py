#!/usr/bin/env python
"""Build the real offline task sequences from texts that Debian packages install (no network needed).

Writes <data-dir>/cl-runner-offline-v1/ (jsonl files and manifest.json) for the task configs
conf/tasks/offline_lm_domains.yaml and conf/tasks/offline_wordnet_senses.yaml, which read the same directory:
$CL_DATA_DIR, default outputs/data relative to where cl-run starts. The same seed and the same installed packages
give byte-identical files; manifest.json records the seed, the sizes, the package versions and a SHA-256 per file.
A task config that finds no data builds it itself (seed 0, default sizes), so this script is for other seeds or
sizes, for building ahead of time (a shared data directory, a cluster node without apt), or to rebuild (--force).

Set-up once (Debian/Ubuntu; .ci/run does the same):
    apt-get install -y --no-install-recommends wordnet-base dict-gcide bible-kjv jargon-text

Usage:
    python scripts/build_offline_data.py                           # outputs/data, seed 0, default sizes
    python scripts/build_offline_data.py --data-dir /data/cl --seed 1 --force
    CL_DATA_DIR=/data/cl cl-run tasks=offline_lm_domains           # the configs find it through CL_DATA_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from cl_runner.core.errors import UserError
from cl_runner.tasks.offline import DEFAULT_DATA_DIR, Sizes, build


def main(argv: list[str] | None = None) -> int:
    defaults = Sizes()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("CL_DATA_DIR", DEFAULT_DATA_DIR),
                        help="where cl-runner-offline-v1/ goes ($CL_DATA_DIR when set)")
    parser.add_argument("--seed", type=int, default=0, help="seeds which documents and facts are sampled")
    parser.add_argument("--lm-train", type=int, default=defaults.lm_train, help="training documents per domain")
    parser.add_argument("--lm-validation", type=int, default=defaults.lm_validation,
                        help="validation documents per domain")
    parser.add_argument("--lm-test", type=int, default=defaults.lm_test, help="held-out test documents per domain")
    parser.add_argument("--max-chars", type=int, default=defaults.max_chars,
                        help="documents are cut at a word boundary after this many characters")
    parser.add_argument("--facts-per-domain", type=int, default=defaults.facts_per_domain,
                        help="WordNet facts per lexicographer domain")
    parser.add_argument("--force", action="store_true", help="replace an existing build")
    args = parser.parse_args(argv)
    sizes = Sizes(lm_train=args.lm_train, lm_validation=args.lm_validation, lm_test=args.lm_test,
                  max_chars=args.max_chars, facts_per_domain=args.facts_per_domain)
    if min(vars(args)[k] for k in ("lm_train", "lm_validation", "lm_test", "max_chars", "facts_per_domain")) < 1:
        parser.error("sizes must be positive")
    started = time.perf_counter()
    try:
        root = build(Path(args.data_dir), seed=args.seed, sizes=sizes, force=args.force)
    except UserError as exc:
        print(f"build_offline_data: error: {exc}", file=sys.stderr)
        return 2
    manifest = json.loads((root / "manifest.json").read_text())
    print(f"built {root} in {time.perf_counter() - started:.1f} s (seed {args.seed}, {len(manifest['files'])} files)")
    for name in sorted(manifest["files"]):
        lines = sum(1 for _ in open(root / name, encoding="utf-8"))
        print(f"  {name}: {lines} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
