"""Write the procedural shapes data set as an image folder: 000000.png + 000000.txt pairs and metadata.jsonl.

    python tools/make_shapes.py --out data/shapes --n 20000                  # the train split
    python tools/make_shapes.py --out data/shapes-heldout --split heldout    # each held-out caption once

The images are deterministic from --seed (see ldm/data/shapes.py). A folder that holds anything is refused
unless --force, which replaces the files this tool writes and keeps any others.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter

from ldm.data.shapes import ShapesDataset, all_specs, split, write_folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=None, help="number of images (default: each caption of the split once)")
    p.add_argument("--seed", type=int, default=0, help="seed of the caption order and the per-image jitter")
    p.add_argument("--split", choices=["train", "heldout", "all"], default="train")
    p.add_argument("--no-jitter", dest="jitter", action="store_false", help="exact positions and sizes")
    p.add_argument("--force", action="store_true", help="write into a folder that is not empty")
    args = p.parse_args(argv)
    if args.n is not None and args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    try:
        n = write_folder(args.out, args.split, args.n, args.seed, jitter=args.jitter, overwrite=args.force)
    except FileExistsError as e:
        print(f"make_shapes: error: {e} (--force replaces it)", file=sys.stderr)
        return 2

    data = ShapesDataset(args.split, args.n, args.seed, jitter=False)
    specs = [data.specs[i % len(data.specs)] for i in range(n)]
    splits = Counter(split(s) for s in specs)
    print(f"wrote {n} images to {args.out} (split {args.split}, seed {args.seed}, "
          f"jitter {'on' if args.jitter else 'off'})")
    print(f"  {len(set(specs))} distinct captions of the {len(all_specs(args.split))} in the split; "
          + ", ".join(f"{k} {v}" for k, v in sorted(splits.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
