"""The bundled sample: 100 real photographs in 10 classes, as WebDataset shards committed under
``data/sample/`` (train: 80 images in 2 shards; ``val/``: 20 images in 1 shard).

The images are crops of public-domain / CC0 photographs shipped inside scikit-image (see
``data/sample/README.md``); nothing is downloaded. ``python -m fastmae.data.sample [OUT]`` regenerates
them deterministically (needs scikit-image, in the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from .index import ShardError

# class name -> scikit-image loader; all photographs with no known copyright restrictions
PHOTOS = (
    "astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass",
    "hubble_deep_field", "retina", "rocket",
)
TRAIN_PER_CLASS = 8
VAL_PER_CLASS = 2
SHORTER_SIDE = 160
_HERE = Path(__file__).resolve().parent / "sample"


def _has_shards(d: Path) -> bool:
    return d.is_dir() and any(d.glob("*.tar"))


def bundled_sample_dir(split: str = "train") -> Path:
    """Folder of the bundled sample's shards for ``split`` (``train`` or ``val``).

    Found next to this module in a repository checkout or editable install; elsewhere (a wheel without
    package data) generated once into ``$FASTMAE_CACHE`` or ``~/.cache/fastmae`` from scikit-image.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r} is not valid; valid splits: train, val")
    here = _HERE if split == "train" else _HERE / "val"
    if _has_shards(here):
        return here
    cache = Path(os.environ.get("FASTMAE_CACHE", Path.home() / ".cache" / "fastmae")) / "sample"
    target = cache if split == "train" else cache / "val"
    if not _has_shards(target):
        try:
            import skimage.data  # noqa: F401
        except ImportError:
            raise ShardError(
                f"the bundled sample is not at {here} and scikit-image is not installed to regenerate it; "
                "install fastmae[dev] or set data.shards to your own shards"
            ) from None
        write_sample(cache)
    return target


def _crops(img: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` random crops covering 45-90% of each side of ``img``."""
    h, w = img.shape[:2]
    out = []
    for _ in range(n):
        ch, cw = int(h * rng.uniform(0.45, 0.9)), int(w * rng.uniform(0.45, 0.9))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        out.append(img[y:y + ch, x:x + cw])
    return out


def write_sample(out: Path) -> None:
    """Write the sample's train and val shards (deterministic) into ``out`` and ``out/val``."""
    import skimage.data
    from PIL import Image

    from .shards import write_shards

    rng = np.random.default_rng(2021)
    with tempfile.TemporaryDirectory() as tmp:
        for name in PHOTOS:
            img = getattr(skimage.data, name)()
            crops = _crops(img, TRAIN_PER_CLASS + VAL_PER_CLASS, rng)
            for split, part in (("train", crops[:TRAIN_PER_CLASS]), ("val", crops[TRAIN_PER_CLASS:])):
                d = Path(tmp) / split / name
                d.mkdir(parents=True, exist_ok=True)
                for i, c in enumerate(part):
                    Image.fromarray(c).save(d / f"{name}_{split}_{i}.png")  # PNG -> re-encoded as RGB JPEG
        out.mkdir(parents=True, exist_ok=True)
        for old in list(out.glob("*.tar")) + list(out.glob("*.idx")):
            old.unlink()
        common = dict(resize=SHORTER_SIDE, quality=90, workers=1, seed=0, progress=False)
        rep = write_shards(Path(tmp) / "train", out, samples_per_shard=40, **common)  # type: ignore[arg-type]
        if (out / "val").exists():
            shutil.rmtree(out / "val")
        write_shards(Path(tmp) / "val", out / "val", samples_per_shard=40, **common)  # type: ignore[arg-type]
    for d in (out, out / "val"):
        (d / "report.json").unlink(missing_ok=True)  # holds temporary paths; the sample is fixed
    if rep["skipped"]:
        raise ShardError(f"bundled sample: images skipped: {rep['skipped']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastmae.data.sample", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", type=Path, default=_HERE, help=f"output folder (default {_HERE})")
    args = ap.parse_args(argv)
    write_sample(args.out)
    print(f"wrote the bundled sample to {args.out} (train) and {args.out / 'val'} (val)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
