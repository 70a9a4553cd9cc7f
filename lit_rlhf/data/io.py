"""Reading records: a local directory of JSONL files or a Hugging Face hub dataset, through ``datasets``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Optional

import datasets


def _required_present(row: dict, field: str) -> bool:
    value = row
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    return True


#: an example of the hub names :func:`load_split` accepts
HUB_NAME_EXAMPLE = "vwxyzjn/summarize_from_feedback_tldr_3_filtered"


def validate_jsonl(path: Path, required: Iterable[str], check: Optional[Callable[[dict], Optional[str]]] = None) -> int:
    """Check that every line of ``path`` is UTF-8 text holding a JSON object with the ``required`` fields (dotted for
    nesting) and, when given, that ``check(row)`` finds no problem (it returns the problem's description or ``None``).

    Returns:
        the number of records.

    Raises:
        FileNotFoundError: naming the path, when it is missing.
        ValueError: naming the file and line number for a byte that is not UTF-8, malformed JSON, a missing field
            or a problem ``check`` reports, or the file when it holds no record.
    """
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    count = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{path}:{number}: not UTF-8 text (byte 0x{raw[error.start]:02x} at byte {error.start + 1} of the line)"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: malformed JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            for field in required:
                if not _required_present(row, field):
                    raise ValueError(f"{path}:{number}: missing field '{field}'")
            problem = check(row) if check is not None else None
            if problem:
                raise ValueError(f"{path}:{number}: {problem}")
            count += 1
    if count == 0:
        raise ValueError(f"data file {path} is empty")
    return count


def first_row(path: Path) -> dict:
    """The first JSON object of a JSONL file (for format detection).

    Raises:
        FileNotFoundError: naming the path, when it is missing.
        ValueError: naming the file and line for a first record that is not a JSON object, or the file when empty.
    """
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise ValueError(f"{path}:{number}: malformed JSON or not UTF-8 ({error})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            return row
    raise ValueError(f"data file {path} is empty")


def looks_like_hub_name(source: str) -> bool:
    """Whether ``source`` has the form of a hub dataset name: ``name`` or ``owner/name``, no path syntax."""
    parts = source.split("/")
    return len(parts) <= 2 and all(parts) and not source.startswith(("~", ".")) and "\\" not in source and not source.endswith(".jsonl")


def split_file(split: str) -> str:
    """The split name of a split expression: ``"train"`` for ``"train[-2000:]"`` (``datasets``' slicing syntax)."""
    return split.split("[", 1)[0]


def load_split(
    source: str,
    split: str,
    required: Iterable[str],
    hub_config: Optional[str] = None,
    check: Optional[Callable[[dict], Optional[str]]] = None,
) -> datasets.Dataset:
    """Load one split from a local directory (``{source}/{split}.jsonl``) or a hub dataset name.

    Local files are validated line by line first (see :func:`validate_jsonl`), then read by ``datasets``'
    JSON builder, which caches them. A source that is not a local directory is looked up on the hub only when it
    has a hub name's form (``owner/name``); anything else is reported as a missing directory, before any lookup.

    Args:
        source: directory path or hub dataset name (e.g. ``vwxyzjn/summarize_from_feedback_tldr_3_filtered``).
        split: ``"train"``, ``"validation"`` or ``"test"``, or a slice of one in ``datasets``' syntax
            (``"train[:-2000]"``, ``"train[-2000:]"``, ``"train[:5%]"``): a local directory's ``train.jsonl`` then.
        required: fields every record must have (dotted names for nested fields).
        hub_config: the hub dataset's configuration (``"comparisons"`` for OpenAI's preference data).
        check: a further per-record check for local files (see :func:`validate_jsonl`).

    Raises:
        FileNotFoundError: when ``source`` is a file (say to pass its directory), a missing local path, or a
            hub-like name that is neither a local directory nor loadable from the hub; or its split file is missing.
        ValueError: for malformed lines, missing fields or an empty file (see :func:`validate_jsonl`).
    """
    required = list(required)
    directory = Path(source).expanduser()
    if directory.is_dir():
        path = directory / f"{split_file(split)}.jsonl"
        validate_jsonl(path, required, check)
        return datasets.load_dataset("json", data_files={split_file(split): str(path)}, split=split)
    if directory.is_file():
        raise FileNotFoundError(
            f"data path {source} is a file: pass the directory that holds {{train,validation}}.jsonl "
            f"({directory.parent}), not one of its files"
        )
    if not looks_like_hub_name(source):
        raise FileNotFoundError(
            f"data directory {source} does not exist (resolved to {directory.absolute()}); "
            f"a hub dataset name looks like '{HUB_NAME_EXAMPLE}'"
        )
    try:
        dataset = datasets.load_dataset(source, hub_config, split=split)
    except (FileNotFoundError, ConnectionError, ValueError) as error:  # datasets' errors for unknown or offline names
        raise FileNotFoundError(
            f"data path {source}: no such local directory (relative to {Path.cwd()}), and loading it as a hub dataset "
            f"failed: {error}"
        ) from error
    missing = [field for field in required if field.split(".")[0] not in dataset.column_names]
    if missing:
        raise ValueError(f"hub dataset {source} split {split} lacks field(s) {missing}")
    return dataset
