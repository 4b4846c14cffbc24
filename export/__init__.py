"""edgesep.export: torch -> ONNX with Kronecker lowering, simplification, INT8 quantization and bundles.

Not implemented yet (see the export issue). The package exists so the layout and import names are fixed.
"""

__all__: list[str] = []
