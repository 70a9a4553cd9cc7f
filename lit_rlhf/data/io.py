"""Reading records: a local directory of JSONL files or a Hugging Face hub dataset, through ``datasets``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

import datasets


def _required_present(row: dict, field: str) -> bool:
    value = row
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    return True


def validate_jsonl(path: Path, required: Iterable[str]) -> int:
    """Check that every line of ``path`` is a JSON object with the ``required`` fields (dotted for nesting).

    Returns:
        the number of records.

    Raises:
        FileNotFoundError: naming the path, when it is missing.
        ValueError: naming the file and line number for malformed JSON or a missing field, or the file when
            it holds no record.
    """
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    count = 0
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
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
            count += 1
    if count == 0:
        raise ValueError(f"data file {path} is empty")
    return count


def load_split(source: str, split: str, required: Iterable[str], hub_config: Optional[str] = None) -> datasets.Dataset:
    """Load one split from a local directory (``{source}/{split}.jsonl``) or a hub dataset name.

    Local files are validated line by line first (see :func:`validate_jsonl`), then read by ``datasets``'
    JSON builder, which caches them.

    Args:
        source: directory path or hub dataset name (e.g. ``vwxyzjn/summarize_from_feedback_tldr_3_filtered``).
        split: ``"train"``, ``"validation"`` or ``"test"``.
        required: fields every record must have (dotted names for nested fields).
        hub_config: the hub dataset's configuration (``"comparisons"`` for OpenAI's preference data).

    Raises:
        FileNotFoundError: when a local-looking source or its split file is missing.
        ValueError: for malformed lines, missing fields or an empty file (see :func:`validate_jsonl`).
    """
    required = list(required)
    directory = Path(source).expanduser()
    if directory.is_dir():
        path = directory / f"{split}.jsonl"
        validate_jsonl(path, required)
        return datasets.load_dataset("json", data_files={split: str(path)}, split=split)
    if source.startswith((".", "/", "~")) or directory.suffix == ".jsonl":
        raise FileNotFoundError(f"data directory {directory} does not exist")
    dataset = datasets.load_dataset(source, hub_config, split=split)
    missing = [field for field in required if field.split(".")[0] not in dataset.column_names]
    if missing:
        raise ValueError(f"hub dataset {source} split {split} lacks field(s) {missing}")
    return dataset
