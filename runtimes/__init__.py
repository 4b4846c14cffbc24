"""edgesep.runtimes: one small Runtime interface over ONNX Runtime, TVM and TensorRT (numpy + that backend).

Not implemented yet (see the runtimes issue). The package exists so the layout and import names are fixed.
"""

__all__: list[str] = []
