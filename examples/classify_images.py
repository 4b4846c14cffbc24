#!/usr/bin/env python3
"""Classify image files with an edgesep bundle, the way an app on a device would.

Needs numpy, onnxruntime, Pillow and ``edgesep`` (the base install: numpy only); never torch.

    python examples/classify_images.py models/kron.bundle digit0.png photo.jpg --top 3

Prints one line per image, ``FILE: CLASS (PROB)`` (``--top K``: the K best, comma-separated). Exit status: 0 when
every image was classified, 1 when some could not be read (the others are still classified), 2 for a bad bundle
or option. Errors are one line on stderr, without a traceback.

Conversion to the bundle's input spec (``Session.input_spec``, read from the manifest), and nothing else: EXIF
orientation applied; converted to grayscale (C=1) or RGB (C=3), dropping any alpha channel; resized to H x W with
``--resample`` (default ``box``, area averaging: how scikit-learn's 8x8 digits were made from 32x32 bitmaps, and
an alias-free downscale for photos); 8-bit values scaled by 1/255 to [0, 1]; float32 NCHW. Normalization (mean,
std) is inside the model's graph, so it is not applied here.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps

from edgesep.runtimes import EdgesepError, load

__all__ = ["RESAMPLE", "main", "read_image", "softmax"]

RESAMPLE = {
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}
_MODES = {1: "L", 3: "RGB"}


def read_image(path: str, sample_shape: Sequence[int], resample: str = "box") -> np.ndarray:
    """Read one image file as the bundle's input: float32 (C, H, W) in [0, 1].

    Args:
        path: a file Pillow can decode (PNG, JPEG, BMP, ...).
        sample_shape: (C, H, W) from ``Session.sample_shape``; C must be 1 or 3.
        resample: a key of ``RESAMPLE``.
    Returns:
        The image as float32 (C, H, W).
    Raises:
        OSError: the file is missing or not an image Pillow can read (``PIL.UnidentifiedImageError``).
        ValueError: C is neither 1 nor 3; or the image is too large to decode safely (a decompression bomb).
    """
    c, h, w = (int(d) for d in sample_shape)
    if c not in _MODES:
        raise ValueError(f"the bundle takes {c}-channel images; this app converts to 1 (grayscale) or 3 (RGB)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # refuse, don't just warn
        try:
            with Image.open(path) as im:
                im.load()
                img = ImageOps.exif_transpose(im)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ValueError(f"refusing a very large image ({e})") from e
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")  # palette transparency is only handled on the way through RGBA
    img = img.convert(_MODES[c])
    if img.size != (w, h):
        img = img.resize((w, h), RESAMPLE[resample])
    a = np.asarray(img, dtype=np.float32) / np.float32(255.0)  # (H, W) or (H, W, 3)
    return a[None] if c == 1 else np.ascontiguousarray(a.transpose(2, 0, 1))  # -> (C, H, W)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, K) logits, computed stably in float64."""
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _batches(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Classify image files with an edgesep bundle (numpy + onnxruntime).")
    p.add_argument("bundle", help="a bundle directory (NAME.bundle) or a .tar of one")
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    p.add_argument("--backend", default=None, help="onnxruntime (default), tvm or tensorrt")
    p.add_argument("--target", default=None, help="the target this runs on, e.g. rpi4 (default: this machine)")
    p.add_argument("--precision", default=None, choices=["fp32", "fp16", "int8"], help="default: fp32")
    p.add_argument("--threads", type=int, default=None, help="runtime threads (default: the runtime's)")
    p.add_argument("--top", type=int, default=1, metavar="K", help="print the K most likely classes (default 1)")
    p.add_argument("--batch", type=int, default=32, help="images per inference call (default 32)")
    p.add_argument("--resample", default="box", choices=sorted(RESAMPLE), help="resize filter (default box)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the app.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
    Returns:
        The exit status: 0 all classified, 1 some images unreadable, 2 a bad bundle or option.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.top < 1 or args.batch < 1:
        parser.error("--top and --batch must be >= 1")
    try:
        session = load(args.bundle, args.backend, args.target, args.precision, threads=args.threads)
    except EdgesepError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    failed = 0
    with session:
        shape = session.sample_shape
        if shape[0] not in _MODES:
            print(f"error: bundle {session.bundle.name!r} takes {shape[0]}-channel inputs; not images", file=sys.stderr)
            return 2
        k = min(args.top, len(session.classes))
        for chunk in _batches(args.images, args.batch):
            names, arrays = [], []
            for f in chunk:
                try:
                    arrays.append(read_image(f, shape, args.resample))
                    names.append(f)
                except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
                    print(f"error: {f}: cannot read it as an image ({_one_line(e)})", file=sys.stderr)
                    failed += 1
            if not arrays:
                continue
            try:
                probs = softmax(session.run(np.stack(arrays)))
            except EdgesepError as e:
                print(f"error: {_one_line(e)}", file=sys.stderr)
                return 2
            for name, p in zip(names, probs, strict=True):
                top = np.argsort(-p, kind="stable")[:k]
                print(f"{name}: " + ", ".join(f"{session.classes[i]} ({p[i]:.3f})" for i in top), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
