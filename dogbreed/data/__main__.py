"""``python -m dogbreed.data {stage,check,upload}``: stage a dataset, check it before training, move it to S3."""

from __future__ import annotations

import argparse
import logging
import sys

from dogbreed.data.layout import SPLITS, DataError, build_index
from dogbreed.data.staging import stage, state_dir, upload
from dogbreed.rundir import DATA_REPORT


def _check(source: str, cache_dir: str | None, endpoint_url: str | None) -> int:
    root = stage(source, cache_dir, endpoint_url=endpoint_url)
    report_dir = state_dir(source, cache_dir)
    index = build_index(root, index_dir=report_dir)
    counts = index.counts()
    width = max(len(n) for n in index.class_names)
    print(f"{root}: {len(index.classes)} classes")
    print(f"{'class':<{width}}  " + "  ".join(f"{s:>6}" for s in SPLITS))
    for i, name in enumerate(index.class_names):
        print(f"{name:<{width}}  " + "  ".join(f"{counts[s][i]:>6}" for s in SPLITS))
    print(f"{'total':<{width}}  " + "  ".join(f"{sum(counts[s]):>6}" for s in SPLITS))
    print(f"class imbalance (largest/smallest train class): {index.imbalance_ratio('train'):.2f}")
    if index.excluded:
        print(f"problems: {len(index.excluded)} file(s) excluded (report: {report_dir / DATA_REPORT})")
        for item in index.excluded:
            print(f"  {item['file']}: {item['reason']}")
    else:
        print("problems: none")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dogbreed.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    staged = sub.add_parser("stage", help="stage a source into the cache and print the local folder")
    staged.add_argument("source", help="folder, s3://bucket/prefix, https://...zip or fashion-mnist[:/idx/folder]")
    staged.add_argument("--cache-dir", default=None)
    up = sub.add_parser("upload", help="upload a local dataset folder to s3://bucket/prefix")
    up.add_argument("local_dir")
    up.add_argument("uri")
    check = sub.add_parser("check", help="print per-split class counts, imbalance and problems")
    check.add_argument("source", help="folder, s3://bucket/prefix, https://...zip or fashion-mnist[:/idx/folder]")
    check.add_argument("--cache-dir", default=None)
    for p in (staged, up, check):
        p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (or set AWS_ENDPOINT_URL)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "upload":
            count = upload(args.local_dir, args.uri, endpoint_url=args.endpoint_url)
            print(f"uploaded {count} files to {args.uri}")
            return 0
        if args.command == "stage":
            print(stage(args.source, args.cache_dir, endpoint_url=args.endpoint_url))
            return 0
        return _check(args.source, args.cache_dir, args.endpoint_url)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
