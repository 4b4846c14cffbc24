"""examples/classify_images.py: an app that classifies image files with a bundle (numpy + onnxruntime + Pillow).

Digits from the bundle's clean eval set are written as PNG (upscaled 4x, nearest) and JPEG into tmp; the app runs
as a subprocess. Independent reference: the digits' own 8-bit pixel values / 255 (a 4x4 box average of a
nearest-upscaled image gives the pixel back), run through ``load(bundle)`` in this process.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")
Image = pytest.importorskip("PIL.Image")

from edgesep.bundle import open_bundle  # noqa: E402
from edgesep.export import export_run  # noqa: E402
from edgesep.runtimes import load  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "examples" / "classify_images.py"
_LINE = re.compile(r"^(?P<file>.+?): (?P<top>.+)$")
_ITEM = re.compile(r"(?P<cls>\S+) \((?P<p>[0-9.]+)\)")


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, tiny_run) -> Path:
    root = tmp_path_factory.mktemp("examples")
    out = root / "kron.bundle"
    export_run(tiny_run(), out, eval_sets="clean:50", log=_quiet, progress=False)
    return out


@pytest.fixture(scope="module")
def images(bundle_dir, tmp_path_factory) -> tuple[list[Path], np.ndarray]:
    """Seven digit images and the float32 (7, 1, 8, 8) arrays they decode to."""
    out = tmp_path_factory.mktemp("images")
    with open_bundle(bundle_dir) as b:
        x, y = b.load_eval_set("clean")
    files, arrays = [], []
    for i in range(7):
        u8 = np.round(x[i, 0] * 255).astype(np.uint8)  # (8, 8)
        img = Image.fromarray(u8, "L").resize((32, 32), Image.Resampling.NEAREST)
        if i == 5:
            img, name = img.convert("RGB"), f"rgb_{i}_label{y[i]}.png"  # R = G = B: converts back to L exactly
        elif i == 6:
            img, name = img.convert("RGB"), f"photo_{i}_label{y[i]}.jpg"
        else:
            name = f"digit_{i}_label{y[i]}.png"
        img.save(out / name, **({"quality": 95} if name.endswith(".jpg") else {}))
        if name.endswith(".jpg"):  # lossy: the reference is the decoded file, box-averaged 4x4 by the test
            with Image.open(out / name) as im:
                dec = np.asarray(im.convert("L"), dtype=np.int64)  # (32, 32)
            # as Pillow's 8-bit BOX resize does it: columns, then rows, each rounded half up to 8 bits
            cols = (dec.reshape(32, 8, 4).sum(axis=2) + 2) // 4  # (32, 8)
            u8 = ((cols.reshape(8, 4, 8).sum(axis=1) + 2) // 4).astype(np.uint8)  # (8, 8)
        files.append(out / name)
        arrays.append(u8.astype(np.float32)[None] / np.float32(255))
    return files, np.stack(arrays)


def _app(*args: object, blocked: bool = False) -> subprocess.CompletedProcess:
    argv = [str(a) for a in args]
    if not blocked:
        return subprocess.run([sys.executable, str(APP), *argv], capture_output=True, text=True, timeout=120)
    # as on a device: torch, typer and onnx cannot be imported
    code = textwrap.dedent(
        f"""
        import runpy, sys
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "typer", "onnx"):
                    raise ImportError(f"{{name}} is blocked in this test (device side)")
        sys.meta_path.insert(0, _Block())
        sys.argv = [{str(APP)!r}, *{argv!r}]
        runpy.run_path({str(APP)!r}, run_name="__main__")
        """
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def _parse(stdout: str) -> list[tuple[str, list[tuple[str, float]]]]:
    rows = []
    for line in stdout.splitlines():
        m = _LINE.match(line)
        assert m, line
        rows.append((m["file"], [(i["cls"], float(i["p"])) for i in _ITEM.finditer(m["top"])]))
    return rows


@pytest.mark.parametrize("blocked", [False, True], ids=["plain", "torch-typer-onnx-blocked"])
def test_app_matches_load_predict_on_the_same_arrays(bundle_dir, images, blocked):
    files, x = images
    r = _app(bundle_dir, *files, "--top", "3", "--batch", "4", blocked=blocked)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    rows = _parse(r.stdout)
    assert [f for f, _ in rows] == [str(f) for f in files]
    with load(bundle_dir) as s:
        logits = s.run(x)
        classes = s.classes
    z = np.exp(logits - logits.max(1, keepdims=True))
    probs = z / z.sum(1, keepdims=True)
    for (_, top), p, want in zip(rows, probs, logits.argmax(1), strict=True):
        assert len(top) == 3
        assert top[0][0] == classes[want]
        for cls, prob in top:
            assert prob == pytest.approx(p[classes.index(cls)], abs=6e-4)


def test_a_non_image_file_exits_non_zero_without_traceback(bundle_dir, images, tmp_path):
    files, _ = images
    bad = tmp_path / "notes.png"
    bad.write_text("not an image\n")
    r = _app(bundle_dir, bad)
    assert r.returncode == 1 and r.stdout == ""
    assert "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"error: {bad}: cannot read it as an image")
    # the readable images are still classified
    r = _app(bundle_dir, files[0], bad, tmp_path / "missing.png")
    assert r.returncode == 1 and len(r.stdout.splitlines()) == 1 and r.stdout.startswith(str(files[0]))
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 2 and "missing.png" in r.stderr


def test_bundle_and_option_errors_exit_2_on_one_line(bundle_dir, images, tmp_path):
    files, _ = images
    tampered = Path(shutil.copytree(bundle_dir, tmp_path / "t.bundle"))
    data = bytearray((tampered / "model.onnx").read_bytes())
    data[100] ^= 1
    (tampered / "model.onnx").write_bytes(bytes(data))
    for args, needle in [
        ((tmp_path / "nope.bundle", files[0]), "does not exist"),
        ((tampered, files[0]), "sha256"),
        ((bundle_dir, files[0], "--backend", "openvino"), "unknown backend"),
        ((bundle_dir, files[0], "--precision", "int8"), "no artifact"),
    ]:
        r = _app(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr


def test_readme_says_how_to_run_it():
    text = (REPO / "examples" / "README.md").read_text()
    assert "python examples/classify_images.py" in text
