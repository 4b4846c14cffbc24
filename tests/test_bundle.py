"""Bundles: round trip, every refusal (tampering, paths, links, schema, malformed manifests, hostile tars, ONNX
external data), a fuzz test of the deep ONNX check, and the numpy-only import on the device side."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import convert_model_to_external_data
from onnx.reference import ReferenceEvaluator

from edgesep.bundle import (
    SCHEMA_VERSION,
    Bundle,
    Manifest,
    create_bundle,
    open_bundle,
    pack,
)
from edgesep.errors import (
    BundleContentError,
    BundleError,
    BundleLookupError,
    ConfigError,
    IntegrityError,
    ManifestError,
    SchemaVersionError,
    ShapeMismatchError,
    UnsafePathError,
)

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["a", "b", "c"]
W = np.arange(12, dtype=np.float32).reshape(4, 3) / 10  # (C*H*W, classes)


def _tiny_model() -> onnx.ModelProto:
    """input (batch, 1, 2, 2) -> Flatten -> (batch, 4) -> MatMul W (4, 3) -> logits (batch, 3)."""
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(W, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def _data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, 1, 2, 2), dtype=np.float32), rng.integers(0, 3, n).astype(np.int64)


def _new(root: Path, overwrite: bool = False) -> Bundle:
    return create_bundle(
        root,
        name="tiny",
        input_spec={"name": "input", "shape": ["batch", 1, 2, 2]},
        output_spec={"name": "logits", "shape": ["batch", 3]},
        classes=CLASSES,
        provenance={"model": "tiny", "params": 12, "macs": 12, "checkpoint_sha256": "0" * 64},
        overwrite=overwrite,
    )


@pytest.fixture
def bundle(tmp_path: Path) -> Bundle:
    """A complete bundle: fp32 ONNX, a TVM library, clean and adversarial eval sets, reference, a report."""
    b = _new(tmp_path / "tiny.bundle")
    b.add_artifact(_tiny_model().SerializeToString(), "model.onnx", "onnx", "fp32")
    b.add_artifact(b"\x7fELF not really a library", "model.rpi4.so", "tvm-lib", "fp32", "rpi4", {"tvm": "llvm"})
    x, y = _data(5)
    b.add_eval_set("eval/clean.npz", x, y, kind="clean")
    b.add_eval_set(
        "eval/pgd.npz", x, y, kind="adversarial", attack="pgd", norm="linf", eps=8 / 255, steps=10, crafted_on="torch"
    )
    b.set_reference(x, x.reshape(5, 4) @ W)
    b.add_report("quantization", {"accuracy_drop": 0.01, "calibration": 5})
    return b


def _edit_manifest(root: Path, edit: Any) -> None:
    """Apply ``edit(dict)`` (in place) to manifest.json."""
    path = root / "manifest.json"
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


def _put_file(root: Path, rel: str, data: bytes) -> None:
    """Replace a listed file and update its hash and size in the manifest, as a consistent forger would."""
    (root / rel).write_bytes(data)

    def edit(d: dict) -> None:
        for entry in d["artifacts"]:
            if entry["file"] == rel:
                entry["sha256"], entry["size"] = hashlib.sha256(data).hexdigest(), len(data)

    _edit_manifest(root, edit)


# ---------------------------------------------------------------------------------------------------------------
# Round trip


def test_round_trip(bundle: Bundle) -> None:
    b = open_bundle(bundle.root)
    files = b.verify(deep_onnx=True)
    assert b.manifest == bundle.manifest
    assert Manifest.from_dict(b.manifest.to_dict()) == b.manifest
    assert sorted(files) == sorted(
        ["model.onnx", "model.rpi4.so", "eval/clean.npz", "eval/pgd.npz", "reference.npz", "reports/quantization.json"]
    )
    for f in files:  # independent reference for the recorded hashes
        assert hashlib.sha256((b.root / f).read_bytes()).hexdigest() in json.dumps(b.manifest.to_dict())
    m = json.loads((b.root / "manifest.json").read_text())
    assert m["schema_version"] == SCHEMA_VERSION and m["input"]["range"] == [0.0, 1.0]
    assert m["preprocessing"] == {"normalization": "inside_graph", "layout": "NCHW"}
    assert m["created"].endswith("Z")

    x, y = b.load_eval_set("clean")
    x0, y0 = _data(5)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(y, y0)
    assert x.dtype == np.float32 and y.dtype == np.int64
    pgd = next(e for e in b.manifest.eval_sets if e.id == "pgd")
    assert (pgd.kind, pgd.attack, pgd.norm, pgd.steps, pgd.n) == ("adversarial", "pgd", "linf", 10, 5)

    # the reference logits are what the stored ONNX computes (onnx's reference evaluator as the oracle)
    rx, logits = b.load_reference()
    art = b.artifact(kind="onnx")
    (out,) = ReferenceEvaluator(str(b.path_of(art))).run(None, {"input": rx})
    np.testing.assert_allclose(out, logits, rtol=1e-6)
    assert b.load_report("quantization") == {"accuracy_drop": 0.01, "calibration": 5}


def test_artifact_selection(bundle: Bundle) -> None:
    assert bundle.artifact(target="rpi4").file == "model.rpi4.so"
    assert bundle.artifact(id="onnx-fp32-any").kind == "onnx"
    with pytest.raises(BundleLookupError, match=r"no artifact matches.*onnx-fp32-any .*tvm-lib-fp32-rpi4"):
        bundle.artifact(precision="int8")
    with pytest.raises(BundleLookupError, match=r"2 artifacts match.*narrow"):
        bundle.artifact(precision="fp32")
    with pytest.raises(BundleLookupError, match=r"no eval set 'nope'.*\['clean', 'pgd'\]"):
        bundle.load_eval_set("nope")
    with pytest.raises(BundleLookupError, match="no report"):
        bundle.load_report("nope")


def test_replacing_an_artifact_updates_it_and_removes_the_old_file(bundle: Bundle) -> None:
    model = _tiny_model()
    model.doc_string = "v2"
    a = bundle.add_artifact(model.SerializeToString(), "model.onnx", "onnx", "fp32")
    assert [x.id for x in bundle.manifest.artifacts] == ["onnx-fp32-any", "tvm-lib-fp32-rpi4"]
    assert a.sha256 == hashlib.sha256(model.SerializeToString()).hexdigest()
    bundle.add_artifact(model.SerializeToString(), "model.v2.onnx", "onnx", "fp32")  # same id, new file
    assert not (bundle.root / "model.onnx").exists()
    assert bundle.artifact(kind="onnx").file == "model.v2.onnx"
    open_bundle(bundle.root).verify(deep_onnx=True)


def test_writer_refuses_bad_input(bundle: Bundle, tmp_path: Path) -> None:
    x, y = _data(3)
    with pytest.raises(ConfigError, match="float32"):
        bundle.add_eval_set("eval/e.npz", x.astype(np.float64), y, kind="clean")
    with pytest.raises(ShapeMismatchError, match="model input"):
        bundle.add_eval_set("eval/e.npz", np.zeros((3, 1, 3, 3), np.float32), y, kind="clean")
    with pytest.raises(ConfigError, match="within"):
        bundle.add_eval_set("eval/e.npz", x + 1, y, kind="clean")
    with pytest.raises(ConfigError, match="labels outside"):
        bundle.add_eval_set("eval/e.npz", x, y + 3, kind="clean")
    with pytest.raises(ConfigError, match="needs attack, norm and eps"):
        bundle.add_eval_set("eval/e.npz", x, y, kind="adversarial", attack="pgd")
    with pytest.raises(ConfigError, match="kind"):
        bundle.add_artifact(b"x", "m.bin", "exe", "fp32")
    with pytest.raises(ConfigError, match="already belongs"):
        bundle.add_artifact(b"x", "eval/clean.npz", "onnx", "int8")
    with pytest.raises(UnsafePathError):
        bundle.add_artifact(b"x", "../escape.onnx", "onnx", "int8")
    with pytest.raises(ShapeMismatchError, match="logits"):
        bundle.set_reference(x, np.zeros((3, 4), np.float32))
    with pytest.raises(ConfigError, match="not plain JSON"):
        bundle.add_report("bad", {"x": float("nan")})
    assert not (tmp_path / "escape.onnx").exists()
    open_bundle(bundle.root)  # nothing above left the bundle inconsistent


def test_create_refuses_non_empty_dir_and_overwrites_only_a_bundle(bundle: Bundle, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="overwrite=True"):
        _new(bundle.root)
    b = _new(bundle.root, overwrite=True)
    assert b.manifest.artifacts == () and sorted(p.name for p in b.root.iterdir()) == ["manifest.json"]
    other = tmp_path / "not_a_bundle"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(BundleError, match="refusing to delete"):
        _new(other, overwrite=True)
    assert (other / "precious.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------------------------
# Refusals


def test_tampered_byte_is_refused(bundle: Bundle) -> None:
    path = bundle.root / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    expected = bundle.artifact(kind="onnx").sha256
    with pytest.raises(IntegrityError, match=r"model\.onnx") as e:
        open_bundle(bundle.root)
    assert e.value.expected == expected and e.value.actual == hashlib.sha256(data).hexdigest()
    assert expected in str(e.value) and e.value.actual in str(e.value)


def test_tampered_eval_set_is_refused_on_load_too(bundle: Bundle) -> None:
    b = open_bundle(bundle.root)
    path = b.root / "eval/clean.npz"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"eval/clean\.npz"):  # checked on the bytes read, after open
        b.load_eval_set("clean")


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "eval/../../x", "./model.onnx", "eval\\..\\x", "manifest.json"])
def test_manifest_path_leaving_the_bundle_is_refused(bundle: Bundle, bad: str) -> None:
    _edit_manifest(bundle.root, lambda d: d["artifacts"][0].update(file=bad))
    with pytest.raises(UnsafePathError, match="inside the bundle"):
        open_bundle(bundle.root, verify=False)


def test_symlink_inside_the_bundle_is_refused_even_if_it_points_inside(bundle: Bundle) -> None:
    os.symlink("model.onnx", bundle.root / "alias.onnx")
    with pytest.raises(UnsafePathError, match=r"alias\.onnx.*symlink"):
        open_bundle(bundle.root)


def test_symlinked_directory_leading_outside_is_refused(bundle: Bundle, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (bundle.root / "eval/clean.npz").rename(outside / "clean.npz")
    (bundle.root / "eval/pgd.npz").rename(outside / "pgd.npz")
    (bundle.root / "eval").rmdir()
    os.symlink(outside, bundle.root / "eval")
    with pytest.raises(UnsafePathError, match="symlink"):
        open_bundle(bundle.root)
    b = open_bundle(bundle.root, verify=False)
    with pytest.raises(UnsafePathError, match="symlink"):  # even without verify, reading never follows it
        b.load_eval_set("clean")


def test_unknown_schema_version_is_refused(bundle: Bundle) -> None:
    _edit_manifest(bundle.root, lambda d: d.update(schema_version=99))
    with pytest.raises(SchemaVersionError, match=r"99 is not supported; this edgesep reads schema versions \[1\]"):
        open_bundle(bundle.root)


def test_missing_file_is_refused(bundle: Bundle) -> None:
    (bundle.root / "reference.npz").unlink()
    with pytest.raises(IntegrityError, match=r"reference\.npz: missing"):
        open_bundle(bundle.root)


def test_unlisted_file_is_refused(bundle: Bundle) -> None:
    (bundle.root / "model.onnx.data").write_bytes(b"weights nobody hashed")
    with pytest.raises(IntegrityError, match=r"model\.onnx\.data: is not listed"):
        open_bundle(bundle.root)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must hold a JSON object, got list"),
        ('{"schema_version": 1, "schema_version": 1}', "duplicate key"),
        ('{"schema_version": NaN}', "NaN is not JSON"),
        ("\xff\xfe", "not valid JSON"),
    ],
)
def test_malformed_manifest_text_is_refused(bundle: Bundle, text: str, match: str) -> None:
    (bundle.root / "manifest.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ManifestError, match=match):
        open_bundle(bundle.root)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.update(schema_version="1"), r"schema_version must be an integer"),
        (lambda d: d["artifacts"][0].update(size="12"), r"artifacts\[0\]\.size must be an integer"),
        (lambda d: d["artifacts"][1].update(sha256="abc"), r"artifacts\[1\]\.sha256 must be a sha256"),
        (lambda d: d["artifacts"][0].update(kind="exe"), r"artifacts\[0\]\.kind is 'exe'"),
        (lambda d: d["eval_sets"][0].pop("n"), r"eval_sets\[0\]: missing required field\(s\) \['n'\]"),
        (lambda d: d.update(surprise=1), r"unknown field\(s\) \['surprise'\]"),
        (lambda d: d.update(artifacts={}), r"artifacts must be a list"),
        (lambda d: d["input"].update(shape=["batch", 0, 2, 2]), r"input\.shape\[1\] must be an integer >= 1"),
        (lambda d: d["input"].update(range=[0, 255]), r"input\.range"),
        (lambda d: d.update(created="yesterday"), r"created must be an ISO 8601 UTC time"),
        (lambda d: d["artifacts"].append(dict(d["artifacts"][0])), r"duplicate artifact id"),
        (lambda d: d.update(classes=["a", "b"]), r"ends in 3 but there are 2 classes"),
    ],
)
def test_wrongly_typed_manifest_is_refused_naming_the_field(bundle: Bundle, edit: Any, match: str) -> None:
    _edit_manifest(bundle.root, edit)
    with pytest.raises(ManifestError, match=match):
        open_bundle(bundle.root)


def test_eval_set_with_wrong_dtype_is_refused_even_when_its_hash_matches(bundle: Bundle) -> None:
    buf = io.BytesIO()
    x, y = _data(5)
    np.savez(buf, x=x.astype(np.float64), y=y)
    data = buf.getvalue()
    (bundle.root / "eval/clean.npz").write_bytes(data)
    _edit_manifest(
        bundle.root,
        lambda d: d["eval_sets"][0].update(sha256=hashlib.sha256(data).hexdigest(), size=len(data)),
    )
    with pytest.raises(BundleContentError, match="float32"):
        open_bundle(bundle.root).load_eval_set("clean")


# ---------------------------------------------------------------------------------------------------------------
# Tar


def test_tar_pack_open_round_trip(bundle: Bundle, tmp_path: Path) -> None:
    tar = pack(bundle)
    assert tar == bundle.root.with_name("tiny.bundle.tar")
    assert pack(bundle.root, tmp_path / "again.tar").read_bytes() == tar.read_bytes()  # reproducible
    with tarfile.open(tar) as tf:
        assert all(m.name.startswith("tiny.bundle") and (m.isfile() or m.isdir()) for m in tf.getmembers())
    with open_bundle(tar) as b:
        assert b.root != bundle.root and b.manifest == bundle.manifest
        b.verify(deep_onnx=True)
        np.testing.assert_array_equal(b.load_eval_set("pgd")[0], bundle.load_eval_set("pgd")[0])
        extracted = b.root
    assert not extracted.exists()  # the temporary extraction is removed on close
    cache = tmp_path / "cache"
    b = open_bundle(tar, extract_dir=cache)
    b.close()
    assert b.root.is_relative_to(cache) and b.root.exists()  # a caller's cache is kept


def _hostile_tar(path: Path, bundle: Bundle, member: tarfile.TarInfo, data: bytes = b"") -> None:
    with tarfile.open(path, "w") as tf:
        for f in ["manifest.json", *bundle.verify()]:
            tf.add(bundle.root / f, f"tiny.bundle/{f}")
        tf.addfile(member, io.BytesIO(data) if member.isfile() else None)


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", size: int = 4) -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type, m.linkname, m.size = kind, linkname, size if kind == tarfile.REGTYPE else 0
    return m


@pytest.mark.parametrize(
    ("member", "match"),
    [
        (_member("../evil"), "leaves the archive"),
        (_member("tiny.bundle/../../evil"), "leaves the archive"),
        (_member("/tmp/evil"), "absolute"),
        (_member("tiny.bundle/link", tarfile.SYMTYPE, "manifest.json"), "symlink"),
        (_member("tiny.bundle/evil", tarfile.SYMTYPE, "/etc/passwd"), "symlink"),
        (_member("tiny.bundle/hard", tarfile.LNKTYPE, "tiny.bundle/manifest.json"), "hard link"),
        (_member("tiny.bundle/dev", tarfile.CHRTYPE), "device"),
        (_member("tiny.bundle/model.onnx"), "appears twice"),
    ],
)
def test_hostile_tar_is_refused_before_extracting_anything(
    bundle: Bundle, tmp_path: Path, member: tarfile.TarInfo, match: str
) -> None:
    tar = tmp_path / "hostile.tar"
    _hostile_tar(tar, bundle, member, b"evil")
    cache = tmp_path / "cache"
    with pytest.raises(UnsafePathError, match=match):
        open_bundle(tar, extract_dir=cache)
    assert not (tmp_path / "evil").exists() and not list(cache.glob("*"))


def test_tampered_tar_is_refused_and_leaves_nothing_behind(bundle: Bundle, tmp_path: Path) -> None:
    tar = tmp_path / "tampered.tar"
    with tarfile.open(tar, "w") as tf:
        for f in ["manifest.json", *bundle.verify()]:
            data = (bundle.root / f).read_bytes()
            if f == "model.onnx":
                data = data[:-1] + bytes([data[-1] ^ 1])
            info = tarfile.TarInfo(f"tiny.bundle/{f}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    cache = tmp_path / "cache"
    with pytest.raises(IntegrityError, match=r"model\.onnx"):
        open_bundle(tar, extract_dir=cache)
    assert not list(cache.glob("*"))


def test_tar_without_a_bundle_or_not_a_tar_is_refused(tmp_path: Path) -> None:
    tar = tmp_path / "empty.tar"
    with tarfile.open(tar, "w") as tf:
        tf.addfile(_member("readme.txt"), io.BytesIO(b"text"))
    with pytest.raises(BundleError, match="does not hold a bundle"):
        open_bundle(tar)
    (tmp_path / "junk.tar").write_bytes(b"\0junk" * 100)
    with pytest.raises(BundleError, match="readable tar"):
        open_bundle(tmp_path / "junk.tar")


# ---------------------------------------------------------------------------------------------------------------
# Deep ONNX check


def test_onnx_external_data_inside_the_bundle_passes(bundle: Bundle, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(_tiny_model(), src / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    bundle.add_artifact(
        src / "m.onnx",
        "ext/model.onnx",
        "onnx",
        "fp32",
        id="ext",
        external_data={"ext/m.onnx.data": src / "m.onnx.data"},
    )
    b = open_bundle(bundle.root)
    b.verify(deep_onnx=True)
    assert [r.file for r in b.artifact(id="ext").external_data] == ["ext/m.onnx.data"]
    x, logits = b.load_reference()
    (out,) = ReferenceEvaluator(str(b.path_of(b.artifact(id="ext")))).run(None, {"input": x})
    np.testing.assert_allclose(out, logits, rtol=1e-6)
    pack(b, tmp_path / "ext.tar")
    with open_bundle(tmp_path / "ext.tar") as t:
        t.verify(deep_onnx=True)


@pytest.mark.parametrize(
    ("location", "error", "match"),
    [
        ("../outside.bin", UnsafePathError, "relative path inside the bundle"),
        ("/etc/passwd", UnsafePathError, "relative path inside the bundle"),
        ("missing.bin", IntegrityError, "missing.bin: external data .* is missing"),
        ("eval/clean.npz", IntegrityError, "not listed in the artifact's external_data"),
    ],
)
def test_onnx_external_data_outside_the_bundle_is_refused(
    bundle: Bundle, tmp_path: Path, location: str, error: type, match: str
) -> None:
    (tmp_path / "outside.bin").write_bytes(W.tobytes())  # exists: refused for where it is, not for being absent
    model = _tiny_model()
    convert_model_to_external_data(model, location="w.bin", size_threshold=0)
    for t in model.graph.initializer:
        t.ClearField("raw_data")
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    bundle.add_artifact(model.SerializeToString(), "model.onnx", "onnx", "fp32")
    b = open_bundle(bundle.root)  # the hashes are all fine: only the deep check can see this
    with pytest.raises(error, match=match):
        b.verify(deep_onnx=True)


@pytest.mark.parametrize("data", [b"", b"\x08", b"garbage" * 10, b"\xff" * 64], ids=["empty", "short", "text", "ff"])
def test_garbage_onnx_with_a_matching_hash_is_a_content_error(bundle: Bundle, data: bytes) -> None:
    _put_file(bundle.root, "model.onnx", data)
    b = open_bundle(bundle.root)
    with pytest.raises(BundleContentError, match=r"model\.onnx"):
        b.verify(deep_onnx=True)


def test_truncated_onnx_with_a_matching_hash_is_a_content_error(bundle: Bundle) -> None:
    good = (bundle.root / "model.onnx").read_bytes()
    _put_file(bundle.root, "model.onnx", good[: len(good) // 2])
    with pytest.raises(BundleContentError, match=r"model\.onnx"):
        open_bundle(bundle.root).verify(deep_onnx=True)


def _corruptions(good: bytes) -> st.SearchStrategy[bytes]:
    n = len(good)

    def flip(edits: list[tuple[int, int]]) -> bytes:
        b = bytearray(good)
        for i, mask in edits:
            b[i] ^= mask
        return bytes(b)

    return st.one_of(
        st.integers(0, n - 1).map(lambda i: good[:i]),
        st.lists(st.tuples(st.integers(0, n - 1), st.integers(1, 255)), min_size=1, max_size=8).map(flip),
        st.binary(max_size=2 * n),
        st.tuples(st.integers(0, n), st.binary(min_size=1, max_size=32)).map(lambda t: good[: t[0]] + t[1]),
    )


def test_fuzzed_onnx_either_verifies_or_raises_a_bundle_error(bundle: Bundle) -> None:
    root = bundle.root
    good = (root / "model.onnx").read_bytes()
    outcomes: dict[str, int] = {}

    @settings(max_examples=250, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=_corruptions(good))
    def check(data: bytes) -> None:
        _put_file(root, "model.onnx", data)
        try:
            open_bundle(root, verify=False).verify(deep_onnx=True)
            outcomes["ok"] = outcomes.get("ok", 0) + 1
        except BundleError as e:  # anything else (DecodeError, IndexError, ...) fails the test
            outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1

    check()
    assert outcomes.get("BundleContentError", 0) > 0, outcomes


# ---------------------------------------------------------------------------------------------------------------
# Device side


_BLOCK = textwrap.dedent(
    """
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "onnx", "onnxruntime"):
                raise ImportError(f"{name} is blocked in this test (device side)")
            return None
    sys.meta_path.insert(0, _Block())
    """
)


def test_reader_needs_neither_torch_nor_onnx(bundle: Bundle) -> None:
    code = _BLOCK + textwrap.dedent(
        f"""
        try:
            import onnx
            raise SystemExit("the blocker does not block")
        except ImportError:
            pass
        from edgesep.bundle import open_bundle
        from edgesep.errors import BundleError
        b = open_bundle({str(bundle.root)!r})
        x, y = b.load_eval_set("pgd")
        assert x.shape == (5, 1, 2, 2) and y.shape == (5,)
        b.load_reference()
        try:
            b.verify(deep_onnx=True)
            raise SystemExit("deep check ran without onnx")
        except BundleError as e:
            assert "needs the onnx package" in str(e), e
        bad = [m for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "onnxruntime")]
        assert not bad, bad
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr + r.stdout
