"""Write a built-in data set as a folder of class sub-folders of PNG images: what `--data FOLDER` reads, and with
class names as folder names, what `--pipeline ... --prompt "a handwritten {label}"` captions.

    python -m dpldm.class_folders mnist5k digits/ --class-names zero,one,two,three,four,five,six,seven,eight,nine
    python -m dpldm.train --config mnist --pipeline mnist-fontdigits-text --data digits \\
        --prompt "a handwritten {label}"

Both splits are written (the folder loader makes its own train / test split); nothing else is added or dropped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dpldm.data import BUILT_IN, DataError, load


def write(name: str, out: Path, class_names: list[str] | None = None) -> int:
    """Write every image of a built-in data set as out/<class name>/<split>-<index>.png.

    Args:
        name: a built-in data set (dpldm.data.BUILT_IN).
        out: the folder to write (new, or empty).
        class_names: a name per label, in label order (default the label numbers).

    Returns:
        The number of images written.

    Raises:
        DataError: an unknown data set, names that do not match its classes or are not folder names, or a
            folder that is not empty.
    """
    from PIL import Image

    if name not in BUILT_IN:
        raise DataError(f"{name!r}: not a built-in data set (one of {sorted(BUILT_IN)})")
    ds = load(name)
    names = class_names or [str(c) for c in range(ds.num_classes)]
    if len(names) != ds.num_classes or len(set(names)) != len(names):
        raise DataError(f"{len(names)} class names {names} for the {ds.num_classes} classes of {name}: one distinct "
                        "name per class, in label order")
    bad = [n for n in names if not n or "/" in n or n in (".", "..")]
    if bad:
        raise DataError(f"class names {bad} cannot be folder names")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} is not empty: pass a new folder")
    for n in names:
        (out / n).mkdir(parents=True, exist_ok=True)
    count = 0
    for split_name, split in (("train", ds.train), ("test", ds.test)):
        for i, (image, label) in enumerate(zip(split.images, split.labels, strict=True)):
            pixels = image[..., 0] if image.shape[-1] == 1 else image
            Image.fromarray(pixels).save(out / names[int(label)] / f"{split_name}-{i:05d}.png")
            count += 1
    return count


def main(argv: list[str] | None = None) -> None:
    """The command line.

    Args:
        argv: the arguments (default sys.argv[1:]).
    """
    p = argparse.ArgumentParser(prog="python -m dpldm.class_folders", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help=f"a built-in data set: {', '.join(sorted(BUILT_IN))}")
    p.add_argument("out", type=Path, help="the folder to write")
    p.add_argument("--class-names", help="comma-separated folder name per label, in label order (default 0, 1, ...)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        n = write(args.data, args.out, args.class_names.split(",") if args.class_names else None)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{n} images of {args.data} written to {args.out}/<class>/")


if __name__ == "__main__":
    main()
