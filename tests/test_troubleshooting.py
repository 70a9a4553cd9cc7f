"""docs/troubleshooting.md documents every error message that lit_rlhf raises.

The test reads the package source with :mod:`ast` and finds every ``raise SomeError(<message>)`` (``raise ... from``
included) and every ``require(owner, condition, <message>)`` call (:func:`lit_rlhf.arguments.require` raises
``ValueError(f"{owner}: {message}")``). A message is a string literal or an f-string; its template is the text with
each ``{...}`` as a placeholder. The page documents it when one of its entries (a top-level list item, a paragraph
or a heading) holds the class name and every literal fragment of the template that has a letter in it, after
whitespace and backticks are normalised. So a new message, or a reworded one, fails here until the page has it.
InvalidRow(reason, detail) has two messages, both checked.

Exempt, by rule:

* a bare ``raise`` (re-raise) and ``raise Name`` without a call (``raise NotImplementedError`` in abstract methods,
  ``raise KeyboardInterrupt``);
* a call whose arguments hold no string literal or f-string (``SystemExit(2)``, ``ValueError(problem)``): the message
  is built elsewhere;
* the templates in :data:`EXEMPT`, which have no literal word: they only prefix a message built elsewhere.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lit_rlhf"
PAGE = ROOT / "docs" / "troubleshooting.md"
#: stands for a replacement field ``{...}`` of an f-string in a template
FIELD = "\x00"

#: (file relative to lit_rlhf/, template) -> why: messages whose literal text has no word to look for
EXEMPT = {
    ("arguments.py", f"{FIELD}: {FIELD}"): "require(): the owner, then the caller's message (each require call is checked)",
    ("data/io.py", f"{FIELD}:{FIELD}: {FIELD}"): "file:line, then what the row check returns (documented in prose)",
}


@dataclass(frozen=True)
class Raised:
    """One raised message: where, the exception class's name, and its template."""

    where: str
    cls: str
    template: str

    @property
    def fragments(self) -> list[str]:
        """The literal parts of the template that hold a letter, normalised, without their edge punctuation."""
        parts = (normalise(part.replace("\n", "\\n")).strip(" '\"()[]{}:;,.=<>+/") for part in self.template.split(FIELD))
        return [part for part in parts if re.search("[A-Za-z]", part)]


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("`", "")).strip()


def template(node: ast.expr) -> str | None:
    """The message template of a string literal or f-string (:data:`FIELD` for each replacement field), else ``None``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(value.value if isinstance(value, ast.Constant) else FIELD for value in node.values)
    return None


def raised_messages() -> tuple[list[Raised], int, int]:
    """Every documented-by-rule message in the package, the number of raise statements and of exempt ones."""
    found, raises, exempt = [], 0, 0
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise):
                raises += 1
                call = node.exc
                if not isinstance(call, ast.Call):  # re-raise, or a class without a message
                    exempt += 1
                    continue
                cls = ast.unparse(call.func).rpartition(".")[2]
                templates = [t for t in map(template, call.args) if t is not None]
                if not templates:  # the message is built elsewhere
                    exempt += 1
                    continue
                for text in templates:  # InvalidRow(reason, detail): both reach the user
                    if (relative, text) in EXEMPT:
                        exempt += 1
                    else:
                        found.append(Raised(f"{relative}:{node.lineno}", cls, text))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "require":
                text = template(node.args[2]) if len(node.args) > 2 else None
                assert text is not None, f"{relative}:{node.lineno}: require() with a message that is not a literal"
                found.append(Raised(f"{relative}:{node.lineno}", "ValueError", text))
    return found, raises, exempt


def page_blocks() -> list[str]:
    """The page's entries: its text cut at blank lines, headings and top-level list items (``- `` at column 0)."""
    return [normalise(block) for block in re.split(r"\n\s*\n|\n(?=- |#)", PAGE.read_text(encoding="utf-8"))]


def undocumented(found: list[Raised], blocks: list[str]) -> list[str]:
    """``where: Class: template`` for each message that no block of the page documents."""
    return [
        f"{item.where}: {item.cls}: {item.template.replace(FIELD, '<...>')}"
        for item in found
        if not any(item.cls in block and all(fragment in block for fragment in item.fragments) for block in blocks)
    ]


def test_every_raised_message_is_on_the_troubleshooting_page():
    found, raises, exempt = raised_messages()
    assert raises >= 150 and len(found) >= 150, (raises, len(found))  # the walk sees the package
    missing = undocumented(found, page_blocks())
    assert not missing, "add these errors to docs/troubleshooting.md:\n" + "\n".join(missing)


def test_exemptions_still_exist():
    """Each listed exemption matches a raise in the source: a stale entry is removed, not kept."""
    seen = set()
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                seen.update((relative, t) for t in map(template, node.exc.args) if t is not None)
    assert set(EXEMPT) <= seen, set(EXEMPT) - seen


def test_a_new_message_is_reported(tmp_path):
    """The check fails for a message the page lacks, and for a documented message under another class."""
    source = 'def f(x):\n    raise ValueError(f"the frobnicator {x} is out of widgets")\n'
    node = ast.parse(source).body[0].body[0]
    new = Raised("new.py:2", "ValueError", template(node.exc.args[0]))
    assert new.fragments == ["the frobnicator", "is out of widgets"]
    assert undocumented([new], page_blocks()) == ["new.py:2: ValueError: the frobnicator <...> is out of widgets"]
    known = Raised("x.py:1", "ValueError", f"data file {FIELD} does not exist")  # documented as a FileNotFoundError
    assert undocumented([known], page_blocks()) == ["x.py:1: ValueError: data file <...> does not exist"]
