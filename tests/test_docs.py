"""The documentation site (mkdocs.yml, docs/): it builds in strict mode, every stage page documents every configuration
key of its stage, the API reference covers every module, and every docstring's ``Args:`` names real parameters."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lit_rlhf.cli import STAGES

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

#: subcommand -> the stage pages whose configuration sections, together, document its keys. The critic-free
#: subcommands are the PPO stage with presets: their page gives the presets, the PPO page every key.
STAGE_PAGES = {
    "sft": ["sft.md"],
    "rm": ["reward-model.md"],
    "ppo": ["ppo.md"],
    "rloo": ["policy-gradients.md", "ppo.md"],
    "grpo": ["policy-gradients.md", "ppo.md"],
    "dr-grpo": ["policy-gradients.md", "ppo.md"],
    "reinforce-pp": ["policy-gradients.md", "ppo.md"],
    "dpo": ["dpo.md"],
    "online-dpo": ["online-dpo.md"],
}


def init_keys(cls: type) -> list[str]:
    """The configuration keys of a stage class: its ``__init__`` parameters (what LightningCLI exposes)."""
    return [name for name, p in inspect.signature(cls.__init__).parameters.items()
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def table_keys(text: str) -> set[str]:
    """Keys named as the first cell of a Markdown table row: ``| `key` |``."""
    return set(re.findall(r"^\|\s*`([A-Za-z_][A-Za-z0-9_]*)`\s*\|", text, flags=re.MULTILINE))


def config_sections(page: str) -> tuple[str, str]:
    """A stage page split into (the ``model:`` part, the ``data:`` part): the data part runs from the heading
    ``### `data:``` to the next ``## `` heading; the model part is the rest of the page before it."""
    text = (DOCS / "stages" / page).read_text()
    match = re.search(r"^### `data:`.*?(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL)
    if match is None:
        return text, ""
    return text[: match.start()], match.group(0)


def test_every_subcommand_has_a_page():
    assert set(STAGE_PAGES) == set(STAGES), "a lit-rlhf subcommand without a stage page in STAGE_PAGES (or a stale entry)"
    for pages in STAGE_PAGES.values():
        for page in pages:
            assert (DOCS / "stages" / page).is_file(), page


@pytest.mark.parametrize("subcommand", sorted(STAGE_PAGES))
def test_stage_page_documents_every_key(subcommand):
    """Each ``model:`` key (the LightningModule's ``__init__`` parameters) is a row of a table in the page's model
    sections, each ``data:`` key (the DataModule's) a row of its ``### `data:``` section."""
    module, datamodule, _ = STAGES[subcommand]
    sections = [config_sections(page) for page in STAGE_PAGES[subcommand]]
    model_rows = set().union(*(table_keys(model) for model, _ in sections))
    data_rows = set().union(*(table_keys(data) for _, data in sections))
    missing_model = [key for key in init_keys(module) if key not in model_rows]
    missing_data = [key for key in init_keys(datamodule) if key not in data_rows]
    assert not missing_model, f"{subcommand}: model keys of {module.__name__} missing from {STAGE_PAGES[subcommand]}: {missing_model}"
    assert not missing_data, f"{subcommand}: data keys of {datamodule.__name__} missing from {STAGE_PAGES[subcommand]}: {missing_data}"


def test_stage_pages_name_their_config_files():
    """Every stage config under configs/ (all but pipeline.yaml and the eval configs) is named on a stage page."""
    pages = "\n".join(path.read_text() for path in (DOCS / "stages").glob("*.md"))
    configs = [path.relative_to(ROOT).as_posix() for path in sorted((ROOT / "configs").rglob("*.yaml"))
               if path.stem not in ("pipeline", "eval")]
    assert configs
    assert [config for config in configs if f"`{config}`" not in pages] == []


def test_api_reference_covers_every_module():
    """Every module of the package (``__init__`` files aside) is rendered by a ``::: lit_rlhf.x`` of docs/api/."""
    rendered = set(re.findall(r"^::: (lit_rlhf[\w.]*)\s*$", "\n".join(p.read_text() for p in (DOCS / "api").glob("*.md")),
                              flags=re.MULTILINE))
    modules = {".".join(path.relative_to(ROOT).with_suffix("").parts) for path in (ROOT / "lit_rlhf").rglob("*.py")
               if path.name != "__init__.py"}
    assert sorted(modules - rendered) == [], "modules missing from the API reference (docs/api/*.md)"
    assert sorted(rendered - modules) == [], "API reference entries naming no module"


def documented_names(name: str) -> list[str]:
    """The parameter names of one ``Args:`` entry: ``"chosen, rejected"`` and ``"batch_size / eval_batch_size"``
    name several; ``**kwargs`` is ``kwargs``."""
    return [part.strip().lstrip("*") for part in re.split(r"[,/]", name) if part.strip()]


def undocumented_public_names() -> list[str]:
    """Every public module, class, function and method of lit_rlhf without a docstring (a method overriding a
    documented one, e.g. a Lightning hook, inherits its docstring)."""
    import importlib
    import pkgutil

    import lit_rlhf

    missing = [] if (lit_rlhf.__doc__ or "").strip() else ["lit_rlhf (module)"]
    for info in pkgutil.walk_packages(lit_rlhf.__path__, "lit_rlhf."):
        module = importlib.import_module(info.name)
        if not (module.__doc__ or "").strip():
            missing.append(f"{info.name} (module)")
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != info.name:
                continue
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and not (inspect.getdoc(obj) or "").strip():
                missing.append(f"{info.name}.{name}")
            if not inspect.isclass(obj):
                continue
            for attr, value in vars(obj).items():
                if attr.startswith("_") or not (inspect.isfunction(value) or isinstance(value, (property, staticmethod, classmethod))):
                    continue
                if not (inspect.getdoc(getattr(obj, attr, None)) or "").strip() and not (inspect.getdoc(value) or "").strip():
                    missing.append(f"{info.name}.{name}.{attr}")
    return missing


def test_every_public_name_has_a_docstring():
    """The API reference is generated from the docstrings: no public name without one."""
    assert undocumented_public_names() == []


def test_docstring_args_name_real_parameters():
    """Every ``Args:`` entry of every docstring in the package names parameters of its function (or of its class's
    ``__init__``), every ``Attributes:`` entry of a class one of its members. mkdocs.yml turns griffe's own check off
    because it reads ``"a, b: ..."`` as one unknown name."""
    import griffe

    extensions = griffe.load_extensions(f"{DOCS / 'hooks' / 'runtime_docstrings.py'}:RuntimeDocstrings")
    package = griffe.load("lit_rlhf", search_paths=[str(ROOT)], docstring_parser="google", extensions=extensions)
    problems = []

    def check(obj) -> None:
        for member in obj.members.values():
            if member.is_alias:
                continue
            if member.is_module or member.is_class:
                check(member)
            if not (member.is_function or member.is_class) or member.docstring is None:
                continue
            function = member.members.get("__init__") if member.is_class else member
            parameters = {p.name for p in function.parameters} if function is not None and function.is_function else set()
            for section in member.docstring.parse("google", warn_unknown_params=False, warn_missing_types=False):
                if section.kind.value == "parameters":
                    accepted = parameters
                elif section.kind.value == "attributes" and member.is_class:  # a class's Attributes: its members
                    accepted = set(member.all_members)
                else:
                    continue
                for entry in section.value:
                    # an entry griffe reads without a name ("(others): ..." is a type in parentheses) names nothing
                    unknown = [name for name in documented_names(entry.name) if name not in accepted] or (
                        [] if entry.name else [f"an entry without a parameter name: {entry.annotation}"])
                    if unknown:
                        problems.append(f"{member.filepath.relative_to(ROOT)}:{member.lineno} {member.path}: {unknown}")

    check(package)
    assert problems == [], "Args: entries naming no parameter:\n" + "\n".join(problems)


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    """``mkdocs build --strict`` passes: every page of the nav exists, links and anchors resolve, every ``:::``
    reference is importable and its docstrings parse."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    assert (tmp_path / "site" / "stages" / "ppo" / "index.html").is_file()
    api = (tmp_path / "site" / "api" / "data" / "index.html").read_text()
    assert "Batches hold" in api  # the DataModules' runtime docstrings (docs/hooks/runtime_docstrings.py) rendered
