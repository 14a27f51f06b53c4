"""Build the embedded demo dataset in the dogImages layout from Fashion-MNIST.

Source: Fashion-MNIST (Zalando SE, 2017, MIT/Expat licence), as shipped by Debian's
``dataset-fashion-mnist`` package (``apt-get install dataset-fashion-mnist``), which installs the
original IDX files under ``/usr/share/datasets/fashion-mnist``. Real photos of dogs cannot be
downloaded on an offline machine; Fashion-MNIST is a real labelled image set that can.

The output mirrors Udacity's dogImages: ``<out>/{train,valid,test}/<NNN.Name>/<Name>_<id>.png``.
Images are 28x28 greyscale PNGs, which also exercises the greyscale-to-RGB path of the loader.

    python scripts/make_demo_dataset.py --out dogbreed/demo_data
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from dogbreed.data.fashion_mnist import CLASSES, DEBIAN_DIR, FILES, read_idx

LICENCE = """The images in this folder are a subset of Fashion-MNIST.
Copyright (c) 2017 Zalando SE, https://tech.zalando.com
Licence: MIT (Expat). Source: https://github.com/zalandoresearch/fashion-mnist,
as packaged by Debian (dataset-fashion-mnist). Built by scripts/make_demo_dataset.py.

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction,
including without limitation the rights to use, copy, modify, merge, publish, distribute,
sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions: The above copyright notice and this
permission notice shall be included in all copies or substantial portions of the Software.
THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=DEBIAN_DIR)
    parser.add_argument("--out", type=Path, default=Path("dogbreed/demo_data"))
    parser.add_argument("--train", type=int, default=150, help="train images per class")
    parser.add_argument("--valid", type=int, default=30, help="valid images per class")
    parser.add_argument("--test", type=int, default=30, help="test images per class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if not (args.src / "train-images-idx3-ubyte.gz").exists():
        raise SystemExit(f"{args.src} has no Fashion-MNIST files: run `apt-get install dataset-fashion-mnist`.")
    rng = np.random.default_rng(args.seed)
    train_x, train_y, test_x, test_y = (read_idx(args.src / name, sha) for name, sha in FILES.items())

    if args.out.exists():
        shutil.rmtree(args.out)
    # train and valid come from Fashion-MNIST's train split, test from its test split: no overlap.
    plan = [("train", train_x, train_y, 0, args.train), ("valid", train_x, train_y, args.train, args.valid),
            ("test", test_x, test_y, 0, args.test)]  # fmt: skip
    perm_train = {c: rng.permutation(np.flatnonzero(train_y == c)) for c in range(len(CLASSES))}
    perm_test = {c: rng.permutation(np.flatnonzero(test_y == c)) for c in range(len(CLASSES))}
    for split, images, _, start, count in plan:
        perms = perm_test if split == "test" else perm_train
        for c, name in enumerate(CLASSES):
            folder = args.out / split / f"{c + 1:03d}.{name}"
            folder.mkdir(parents=True)
            for i in perms[c][start : start + count]:
                Image.fromarray(images[i], mode="L").save(folder / f"{name}_{split}{i:05d}.png", optimize=True)
    (args.out / "LICENSE.txt").write_text(LICENCE)
    print(f"wrote {args.out} ({sum(1 for _ in args.out.rglob('*.png'))} images)")


if __name__ == "__main__":
    main()
