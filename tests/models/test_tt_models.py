"""TT models: tt_mlp, tt_convnet and its dense twin garipov_convnet, through export and quantization.

Independent references: closed-form parameter counts written out by hand from the published configuration
(TensorNet-TF, nets/TT-conv-TT-fc.py), the dense twins' own parameter counts, ONNX Runtime sessions opened by the
test, the reconstruct forward against the factorized one.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgesep.errors import ConfigError, ShapeMismatchError  # noqa: E402
from edgesep.layers.tt import TTConv2d, TTLinear  # noqa: E402
from edgesep.models import create_model, list_models  # noqa: E402
from edgesep.models.tt import tt_compression  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_tt_models_are_registered():
    assert {"tt_mlp", "tt_convnet", "garipov_convnet"} <= set(list_models())
    assert list_models("tt_*") == ["tt_convnet", "tt_mlp"]


def test_tt_mlp_default_matches_novikov_layout_and_its_dense_twin():
    m = create_model("tt_mlp")
    (tt,) = [x for x in m.modules() if isinstance(x, TTLinear)]
    assert tt.in_modes == (4, 7, 4, 7) and tt.out_modes == (4, 8, 8, 4) and tt.ranks == (1, 8, 8, 8, 1)
    cores = 1 * 4 * 4 * 8 + 8 * 8 * 7 * 8 + 8 * 8 * 4 * 8 + 8 * 4 * 7 * 1
    assert _params(m) == cores + 1024 + 1024 * 10 + 10
    twin = create_model("mlp", in_shape=[1, 28, 28], hidden=[1024])
    comp = tt_compression(m)
    assert comp["dense_equivalent_params"] == _params(twin) and comp["params"] == _params(m)
    assert comp["ratio"] == pytest.approx(_params(twin) / _params(m))
    x = torch.rand(3, 1, 28, 28)
    assert m(x).shape == (3, 10)
    # digits: each image axis split in two, the same 1024 hidden units
    d = create_model("tt_mlp", in_shape=[1, 8, 8], ranks=[[2, 3, 2]])
    (tt,) = [x for x in d.modules() if isinstance(x, TTLinear)]
    assert tt.in_modes == (2, 4, 2, 4) and tt.ranks == (1, 2, 3, 2, 1)


def test_tt_mlp_rejects_inconsistent_modes():
    with pytest.raises(ShapeMismatchError, match="hold 100 features"):
        create_model("tt_mlp", in_modes=[10, 10])
    with pytest.raises(ShapeMismatchError, match="modes"):
        create_model("tt_mlp", hidden_modes=[[32, 32]])
    with pytest.raises(ConfigError, match="one entry per hidden layer"):
        create_model("tt_mlp", ranks=[4, 4])
    with pytest.raises(ConfigError, match="hidden_modes"):
        create_model("tt_mlp", hidden_modes=1024)


def test_tt_convnet_has_the_published_configuration_and_compression():
    m = create_model("tt_convnet")
    convs = [x for x in m.modules() if isinstance(x, TTConv2d)]
    fcs = [x for x in m.modules() if isinstance(x, TTLinear)]
    assert [(c.in_modes, c.out_modes, c.ranks) for c in convs] == [
        ((4, 4, 4), (4, 4, 4), (16, 16, 16, 1)),
        ((4, 4, 4), (4, 8, 4), (16, 16, 16, 1)),
        *[((4, 8, 4), (4, 8, 4), (16, 16, 16, 1))] * 3,
    ]
    assert [(f.in_modes, f.out_modes, f.ranks) for f in fcs] == [
        ((8, 8, 8, 16), (4, 6, 8, 8), (1, 40, 40, 40, 1)),
        ((4, 6, 8, 8), (4, 4, 4, 8), (1, 30, 30, 30, 1)),
    ]
    # closed form, layer by layer (no biases before batch norm)
    spatial = 3 * 3 * 16
    conv12 = spatial + 16 * 4 * 4 * 16 + 16 * 4 * 4 * 16 + 16 * 4 * 4 * 1
    conv21 = spatial + 16 * 4 * 4 * 16 + 16 * 8 * 4 * 16 + 16 * 4 * 4 * 1
    conv_rest = 3 * (spatial + 16 * 4 * 4 * 16 + 16 * 8 * 8 * 16 + 16 * 4 * 4 * 1)
    fc1 = 1 * 4 * 8 * 40 + 40 * 6 * 8 * 40 + 40 * 8 * 8 * 40 + 40 * 8 * 16 * 1
    fc2 = 1 * 4 * 4 * 30 + 30 * 4 * 6 * 30 + 30 * 4 * 8 * 30 + 30 * 8 * 8 * 1
    bn = 2 * (64 + 64 + 128 * 4 + 1536 + 512)
    total = 3 * 64 * 9 + conv12 + conv21 + conv_rest + fc1 + fc2 + bn + 512 * 10 + 10
    assert _params(m) == total == 334_554
    twin = create_model("garipov_convnet")
    comp = tt_compression(m)
    assert comp["dense_equivalent_params"] == _params(twin) == 13_934_538
    assert comp["ratio"] == pytest.approx(13_934_538 / 334_554) and comp["tt_layers"] == 7
    assert tt_compression(twin)["ratio"] == 1.0


def test_tt_convnet_forwards_agree():
    torch.manual_seed(0)
    m = create_model("tt_convnet").eval()
    x = torch.rand(2, 3, 32, 32)
    outs = []
    for mode in ("reconstruct", "factorized"):
        for c in m.modules():
            if isinstance(c, TTConv2d):
                c.forward_mode = mode
        with torch.no_grad():
            outs.append(m(x))
    assert outs[0].shape == (2, 10)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="conv_forward"):
        create_model("tt_convnet", conv_forward="fast")
    with pytest.raises(ConfigError, match="divisible by 4"):
        create_model("tt_convnet", in_shape=[3, 30, 30])


@pytest.mark.slow  # ~20 s; tests/layers/test_tt.py exports a small TTConv2d + TTLinear in the default run
def test_tt_convnet_exports_factorized_with_standard_ops(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxsim")
    from edgesep.export._onnx import export_onnx

    torch.manual_seed(0)
    m = create_model("tt_convnet").eval()
    rep = export_onnx(m, (3, 32, 32), tmp_path / "tt_convnet.onnx")
    ops = rep.census_after
    assert set(ops) <= {"Conv", "MatMul", "Reshape", "Transpose", "BatchNormalization", "Relu", "MaxPool", "Gemm",
                        "Add", "Mul", "Sub", "Div", "Flatten"}, ops  # fmt: skip
    assert ops["Conv"] == 6  # the dense first conv + one spatial conv per TT conv: no kernel rebuilt
    assert rep.largest_initializer_elems <= rep.max_param_elems
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        ref = m(x).numpy()  # eager: reconstructed kernels
    sess = ort.InferenceSession(str(tmp_path / "tt_convnet.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_tt_mlp_run_exports_with_parity_and_quantizes(tiny_run, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxsim")
    from edgesep.bundle import open_bundle
    from edgesep.export import export_run, quantize_bundle
    from edgesep.runs import load_run

    run = tiny_run("tt_mlp")
    out = tmp_path / "tt.bundle"
    export_run(run, out, eval_sets="clean:300,pgd:linf:0.1:5@100", log=lambda _: None, progress=False)
    b = open_bundle(out)
    prov = b.manifest.provenance
    assert prov["model"] == "tt_mlp" and prov["parity"]["ok"] and prov["parity"]["top1_agreement"] == 1.0
    assert set(prov["export"]["census_after"]) <= {"MatMul", "Reshape", "Transpose", "Add", "Relu", "Gemm", "Sub",
                                                   "Div", "Flatten"}  # fmt: skip
    assert prov["export"]["census_after"]["MatMul"] == 4  # one per core
    model, _ = load_run(run)
    x, y = b.load_eval_set("clean")
    fp32 = ort.InferenceSession(str(b.path_of(b.artifact(precision="fp32"))), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = fp32.run(None, {"input": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    acc_fp32 = float(np.mean(got.argmax(1) == y))
    assert acc_fp32 > 0.5  # trained: far above chance after 2 epochs on digits

    report = quantize_bundle(out, calib=256, max_drop=5.0, max_robust_drop=10.0, log=lambda _: None)
    b = open_bundle(out)
    art = b.artifact(precision="int8")
    int8 = ort.InferenceSession(str(b.path_of(art)), providers=["CPUExecutionProvider"])
    acc_int8 = float(np.mean(int8.run(None, {"input": x})[0].argmax(1) == y))
    assert abs(acc_int8 - acc_fp32) <= 0.05 and report.to_dict()["gate"]
    ops = {n.op_type for n in __import__("onnx").load(str(b.path_of(art))).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
