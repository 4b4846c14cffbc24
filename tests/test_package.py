"""Packaging contracts: the device side imports without torch; the README's commands are what CI runs."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A meta-path finder that makes `import torch` fail, as on a device where torch is absent.
_BLOCK_TORCH = textwrap.dedent(
    """
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test (device side)")
            return None
    sys.meta_path.insert(0, _Block())
    """
)


@pytest.mark.parametrize(
    "module", ["edgesep", "edgesep.export", "edgesep.runtimes", "edgesep.devices", "edgesep.data",
               "edgesep.attacks.square", "edgesep.bundle", "edgesep.errors", "edgesep._io", "edgesep._config"]
)  # fmt: skip
def test_device_side_imports_without_torch(module: str) -> None:
    code = _BLOCK_TORCH + f"import {module}\nassert 'torch' not in sys.modules\nprint('ok')\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_blocker_really_blocks() -> None:
    """The test above can fail: a module that imports torch is caught."""
    code = _BLOCK_TORCH + "import edgesep.layers\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "torch is blocked" in r.stderr


def _readme_commands() -> list[str]:
    lines = (REPO / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1 : lines.index("```", lines.index("```bash") + 1)]
    return [line for line in block if line and not line.startswith("#")]


def test_readme_starts_with_demo_and_test_commands_and_ci_runs_the_test_one() -> None:
    demo, tests = _readme_commands()[:2]
    assert "pip install" in demo and demo.rstrip().endswith("edgesep demo")
    assert "pip install" in tests and "pytest" in tests
    ci = (REPO / ".ci" / "run").read_text()
    assert tests in ci, "the README's test command must be exactly what .ci/run runs"
