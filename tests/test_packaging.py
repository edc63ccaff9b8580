"""Packaging: import hygiene and the installed layout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                         check=True, timeout=120)
    return out.stdout.strip()


def test_import_specdens_imports_no_framework(tmp_path):
    out = _run(
        "import sys, specdens; print(sorted(m for m in ('torch', 'jax', 'tensorflow', "
        "'matplotlib') if m in sys.modules))",
        tmp_path,
    )
    assert out == "[]"


def test_backends_are_subpackages_and_no_top_level_backends(tmp_path):
    out = _run(
        "import importlib.util, sys, specdens.backends; "
        "print(importlib.util.find_spec('backends') is None, 'torch' in sys.modules); "
        "import specdens.backends.torch, specdens.backends.jax, specdens.backends.tf; "
        "print(specdens.backends.torch.__name__, 'torch' in sys.modules)",
        tmp_path,
    )
    assert out.splitlines() == ["True False", "specdens.backends.torch True"]


def test_wheel_layout(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("specdens-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "specdens/backends/torch/__init__.py" in names
    assert "specdens/backends/jax/__init__.py" in names
    assert "specdens/backends/tf/__init__.py" in names
    assert not any(n.startswith("backends/") for n in names)
    meta = next(n for n in names if n.endswith("METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    requires = [ln for ln in text.splitlines()
                if ln.startswith("Requires-Dist") and "extra" not in ln]
    assert sorted(r.split()[1].split(">")[0].split("=")[0] for r in requires) == [
        "array-api-compat", "numpy", "scipy"]
