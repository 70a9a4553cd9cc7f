"""The package's layering: ``lit_rlhf/stages`` (training) and ``lit_rlhf/evaluation`` (``lit-rlhf eval``, ``eval-rm``,
reports) are peers; what both use (sampling, decoding, metrics) lives below both (``lit_rlhf.sampling``,
``lit_rlhf.metrics``, ``lit_rlhf.models``, ``lit_rlhf.algorithms``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lit_rlhf"


def imported_modules(path: Path, root: Path = PACKAGE.parent) -> set[str]:
    """Absolute names of the modules a file imports (``import a.b``, ``from a.b import c`` -> ``a.b`` and ``a.b.c``;
    relative imports resolved against the file's package), at any depth of the file (imports inside functions
    count)."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_imported_modules_sees_every_form(tmp_path):
    sub = tmp_path / "lit_rlhf" / "evaluation"
    sub.mkdir(parents=True)
    (sub / "x.py").write_text(
        "import lit_rlhf.stages.ppo\nfrom lit_rlhf import stages\nfrom ..stages.common import f\n"
        "def g():\n    from lit_rlhf.stages import policy_eval\n"
    )
    names = imported_modules(sub / "x.py", root=tmp_path)
    assert {"lit_rlhf.stages.ppo", "lit_rlhf.stages", "lit_rlhf.stages.common", "lit_rlhf.stages.policy_eval"} <= names


@pytest.mark.parametrize(("importer", "imported"), [("evaluation", "stages"), ("stages", "evaluation")])
def test_stages_and_evaluation_do_not_import_each_other(importer, imported):
    offenders = {
        f"{path.relative_to(PACKAGE.parent)}: {name}"
        for path in sorted((PACKAGE / importer).rglob("*.py"))
        for name in imported_modules(path)
        if name == f"lit_rlhf.{imported}" or name.startswith(f"lit_rlhf.{imported}.")
    }
    assert not offenders, f"lit_rlhf/{importer} imports lit_rlhf/{imported}: {sorted(offenders)}"
