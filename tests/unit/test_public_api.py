"""The public surface of nest_core: every exported name exists, importing stays light."""

import subprocess
import sys

import nest_core


def test_all_names_resolve():
    assert sorted(nest_core.__all__) == sorted({*nest_core._EXPORTS, "__version__"})
    for name in nest_core.__all__:
        assert getattr(nest_core, name) is not None, name


def test_import_does_not_pull_heavy_optional_packages():
    code = ("import sys, nest_core, nest_core.types; heavy = [m for m in ('chromadb', 'faiss', "
            "'transformers', 'sentence_transformers', 'langchain_core', 'llama_index', 'torch') "
            "if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ""
