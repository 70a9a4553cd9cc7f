"""LightningDataModules: one data path for every format (TL;DR, TRL's standard and conversational formats, HH-RLHF).

* :class:`SFTDataModule`: a prompt and its target (supervised fine-tuning), with a loss mask.
* :class:`PromptDataModule`: left-padded prompts only, reshuffled and repeated (PPO and online DPO rollouts, recipe P9),
  with their reference answers.
* :class:`PreferenceDataModule`: chosen/rejected pairs (reward model, DPO).

Rows go one way (recipe D1-D8 for TL;DR, §3 for chat): a source (a local directory holding ``train.jsonl`` /
``validation.jsonl``, or a hub dataset, read through ``datasets``) -> its format, detected from the columns or named
(:mod:`~lit_rlhf.data.formats`) -> a :class:`~lit_rlhf.data.formats.Record` -> token ids through the TL;DR template,
plain text or the model's chat template (:mod:`~lit_rlhf.data.templates`) -> fixed-shape examples
(:mod:`~lit_rlhf.data.examples`). A DataModule reads one source (``path``) or a mixture (``sources``: several, each
with its own format, columns, row cap or weight); every example keeps its source's name, and validation metrics are
reported per source. Batches pad rows of different fixed shapes to the widest, then drop the columns that are padding
in every row, which is exact because positions are derived from the attention mask.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import datasets
import lightning as L
import torch
from datasets.fingerprint import Hasher
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from lit_rlhf.arguments import check_arguments, require
from lit_rlhf.data import examples, formats, formatting, templates
from lit_rlhf.data.examples import Dropped, Lengths
from lit_rlhf.data.formats import Columns, InvalidRow
from lit_rlhf.data.formatting import CNNDM_QUERY_LENGTH, pad, trim_padding
from lit_rlhf.data.io import first_row, load_split, split_file
from lit_rlhf.models.loading import load_tokenizer

log = logging.getLogger(__name__)

#: formatting runs in several processes only for splits of at least this many rows per process, and in at most
#: MAX_FORMAT_PROCESSES
MIN_ROWS_PER_PROCESS = 256
MAX_FORMAT_PROCESSES = 8
#: ``invalid_rows`` values: drop and count rows with broken content (an empty turn, ...), or stop at the first
INVALID_ROWS = ("drop", "error")
#: joins the notes of one row in the formatting's ``notes`` column
NOTE_SEPARATOR = "\x1f"
#: the formats each kind of DataModule reads
KIND_FORMATS = {"sft": formats.SFT_FORMATS, "prompt": formats.PROMPT_FORMATS, "preference": formats.PREFERENCE_FORMATS}


@dataclass
class Source:
    """One dataset of a mixture (``data.sources``), as RLHFlow mixes preference sets for its reward model.

    Attributes:
        path: a local directory with ``train.jsonl`` / ``validation.jsonl`` (``test.jsonl``), or a hub dataset name.
        name: the name metrics are reported under (default: the directory's or dataset's last path part).
        format: a format of :data:`~lit_rlhf.data.formats.FORMATS`, or ``"auto"`` (detected from the columns).
        hub_config: the hub dataset's configuration (``comparisons`` for ``openai/summarize_from_feedback``).
        train_samples / val_samples: use only the first N rows of the split (``None``: the DataModule's setting).
        weight: training rows taken after the cap: ``round(weight * rows)``, the rows repeated when above 1
            (``None``: each row once).
        splits: the source's split for each of ours, e.g. ``{train: "train[:-2000]", validation: "train[-2000:]"}``
            for a set that has a training split only (``datasets``' slicing syntax, local directories too; ``None``:
            the same names).
        prompt_key, completion_key, chosen_key, rejected_key, messages_key, text_key, reference_key: column names.
    """

    path: str
    name: Optional[str] = None
    format: str = "auto"
    hub_config: Optional[str] = None
    train_samples: Optional[int] = None
    val_samples: Optional[int] = None
    weight: Optional[float] = None
    splits: Optional[dict[str, str]] = None
    prompt_key: str = "prompt"
    completion_key: str = "completion"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    messages_key: str = "messages"
    text_key: str = "text"
    reference_key: str = "reference"

    def split(self, split: str) -> str:
        """The source's name (or slice expression) for our ``split``."""
        return (self.splits or {}).get(split, split)

    def __post_init__(self) -> None:
        if self.format != "auto" and self.format not in formats.FORMATS:
            raise ValueError(f"source {self.path}: unknown format '{self.format}'; formats: auto, {', '.join(formats.FORMATS)}")
        check_arguments(f"source {self.path}", vars(self), positive=("train_samples", "val_samples", "weight"))
        if self.name is None:
            self.name = Path(self.path.rstrip("/")).name or self.path

    def columns(self) -> Columns:
        """The column names this source reads its fields from (the keys of its rows)."""
        return Columns(**{f.name: getattr(self, f.name) for f in fields(Columns)})


def _row_checker(format: str, keys: Columns, invalid_rows: str) -> Callable[[dict], Optional[str]]:
    """A per-line check for :func:`~lit_rlhf.data.io.validate_jsonl`: the row's problem (a missing or malformed field;
    with ``invalid_rows="error"`` broken content too), or ``None``."""

    def check(row: dict) -> Optional[str]:
        try:
            formats.to_record(row, format, keys)
        except InvalidRow as error:
            if invalid_rows == "error":
                return f"{error} (a row {error.reason}; data.invalid_rows=drop drops such rows and counts them)"
        except (KeyError, ValueError) as error:
            return str(error.args[0]) if error.args else repr(error)
        return None

    return check


def _build_row(
    row: dict, format: str, keys: Columns, kind: str, renderer: templates.Renderer, lengths: Lengths, source: str
) -> tuple[dict[str, Any], list[str]]:
    """A source row -> :class:`~lit_rlhf.data.formats.Record` -> the example of ``kind`` and its notes."""
    record = formats.to_record(row, format, keys)
    builder = {"sft": examples.sft_example, "prompt": examples.prompt_example, "preference": examples.preference_example}[kind]
    return builder(record, renderer, lengths, source)


def _build(
    split: datasets.Dataset, builder: Callable, what: str, source: str, shapes: dict[str, set[int]], columns: tuple[str, ...],
    invalid_rows: str = "drop",
) -> datasets.Dataset:
    """Map rows through ``builder``, drop the rows it rejects and warn once with the count of each reason (and of the
    rows it kept but cut), assert the fixed shapes (recipe D7): every ``*_ids`` column's length is one of
    ``shapes[column]`` (checked on the first 64 rows).

    ``builder(row)`` returns ``(example, notes)``, or raises :class:`~lit_rlhf.data.examples.Dropped` (a row that does
    not fit), :class:`~lit_rlhf.data.formatting.QueryTooLong` (a prompt that does not fit even when cut) or
    :class:`~lit_rlhf.data.formats.InvalidRow` (broken content; raised again with ``invalid_rows="error"``).

    Raises:
        ValueError: naming the source, the split and the row (its id, and its 1-based index, the line of a file without
            blank lines), for a row with a missing or invalid field; naming the source, when no row is left.
    """

    def build_rows(rows: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {column: [] for column in (*columns, "drop", "notes")}
        for index, position in zip(range(len(next(iter(rows.values())))), indices):
            row = {key: values[index] for key, values in rows.items()}
            example, notes, drop = None, [], ""
            try:
                example, notes = builder(row)
            except Dropped as error:
                drop = error.reason
            except formatting.QueryTooLong:
                drop = "whose prompt does not fit its budget even when cut"
            except InvalidRow as error:
                if invalid_rows == "error":
                    raise ValueError(f"{what}, row {position + 1}: {error} (data.invalid_rows=drop drops such rows)") from None
                drop = f"{error.reason} (first: row {position + 1}, {error})"
            except (KeyError, ValueError) as error:
                row_id = row.get("id") or (row.get("info") or {}).get("id") if isinstance(row.get("info") or {}, dict) else row.get("id")
                message = error.args[0] if error.args else repr(error)
                raise ValueError(f"{source} ({what}), row {position + 1} (id={row_id}): {message}") from None
            for column in columns:
                out[column].append(example[column] if example is not None else None)
            out["drop"].append(drop)
            out["notes"].append(NOTE_SEPARATOR.join(notes))  # a string column: Arrow cannot type a batch of empty lists
        return out

    # datasets fingerprints module-level functions by name: add the formatting code itself so that a changed
    # template or layout never reuses a stale cache
    code = [inspect.getsource(module) for module in (formatting, formats, templates, examples, sys.modules[__name__])]
    fingerprint = Hasher.hash([split._fingerprint, what, code, builder, columns, invalid_rows])
    # clever truncation tokenises a query once per dropped character (~35 ms a row): large splits are formatted by
    # one process per core (the rows are independent; the cache is the same for any number of processes)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    num_proc = min(cores, MAX_FORMAT_PROCESSES, len(split) // MIN_ROWS_PER_PROCESS)
    built = split.map(
        build_rows, batched=True, batch_size=MIN_ROWS_PER_PROCESS, remove_columns=split.column_names, desc=f"formatting {what}",
        new_fingerprint=fingerprint, num_proc=num_proc if num_proc > 1 else None, with_indices=True,
    )
    drops = Counter(_first_words(reason) for reason in built["drop"] if reason)
    notes = Counter(note for row_notes in built["notes"] if row_notes for note in row_notes.split(NOTE_SEPARATOR))
    if drops or notes:
        firsts = {}
        for reason in built["drop"]:
            firsts.setdefault(_first_words(reason), reason)
        dropped = ", ".join(f"{count} {firsts[reason]}" for reason, count in drops.items())
        cut = ", ".join(f"{count} {note}" for note, count in notes.items())
        log.warning("%s: %s", what, "; ".join(part for part in (
            f"dropped {sum(drops.values())} of {len(split)} rows: {dropped}" if drops else "",
            f"kept {cut}" if cut else "",
        ) if part))
    if drops:
        built = built.filter(lambda reasons: [not reason for reason in reasons], input_columns="drop", batched=True)
    built = built.remove_columns(["drop", "notes"])
    if len(built) == 0:
        raise ValueError(f"{source}: no {what} row fits the configured lengths")
    for column in built.column_names:
        if column.endswith("_ids"):
            lengths = {len(ids) for ids in built[:64][column]}
            assert lengths <= shapes[column], f"{what}.{column} has lengths {lengths}, expected {shapes[column]}"  # recipe D7
    return built


def _first_words(reason: str) -> str:
    """A drop reason without its ``(first: ...)`` example, for counting."""
    return reason.split(" (first: ")[0]


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation of ``range(num_rows)`` per epoch, a function of ``(seed, epoch)`` alone.

    Epoch ``e`` yields the order ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))`` yields in
    its ``e``-th epoch (the same random draws, replayed), so switching to this sampler changes no run. Because the
    order depends on nothing but the seed and the epoch (set by Lightning through :meth:`set_epoch`), a run resumed
    mid-epoch from a checkpoint sees exactly the batches the uninterrupted run would have seen: the
    ``StatefulDataLoader`` skips the ones already consumed. The seed is shared by every rank (recipe P11).
    """

    def __init__(self, num_rows: int, seed: int = 0) -> None:
        self.num_rows, self.seed, self.epoch = num_rows, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s permutation from the next iteration on (Lightning calls it at every epoch's start)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        # a generator, so the permutation is drawn at the first ``next``: Lightning creates the loader's iterator
        # before it calls ``set_epoch``
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epoch + 1):
            # per epoch, torch's DataLoader draws a worker base seed, then RandomSampler one permutation for the
            # epoch and one (empty slice) for the remainder
            torch.empty((), dtype=torch.int64).random_(generator=generator)
            order = torch.randperm(self.num_rows, generator=generator)
            torch.randperm(self.num_rows, generator=generator)
        yield from order.tolist()

    def __len__(self) -> int:
        return self.num_rows


class RepeatedShuffleSampler(Sampler[int]):
    """Yields ``num_samples`` indices: fresh permutations of ``range(num_rows)`` one after another (recipe P9).

    The seed is the same on every rank (recipe P11); under DDP Lightning shards the stream across ranks.
    """

    def __init__(self, num_rows: int, num_samples: int, seed: int = 0) -> None:
        self.num_rows, self.num_samples, self.seed = num_rows, num_samples, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Epoch ``e`` yields the ``e``-th block of ``num_samples`` indices of the same endless stream (Lightning
        calls this): online DPO runs one iteration per epoch, each on new prompts, resumable at any epoch."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        # a generator, so the permutation is drawn at the first ``next``: Lightning creates the loader's iterator
        # before it calls ``set_epoch``
        generator = torch.Generator().manual_seed(self.seed)
        skip, produced = self.epoch * self.num_samples, 0
        while produced < self.num_samples:
            for index in torch.randperm(self.num_rows, generator=generator).tolist():
                if produced == self.num_samples:
                    return
                if skip:
                    skip -= 1
                    continue
                yield index
                produced += 1

    def __len__(self) -> int:
        return self.num_samples


class _DataModule(L.LightningDataModule):
    """Loading (one source or a mixture), formatting, subsetting and collation shared by the DataModules.

    Subclasses set :attr:`kind` (the examples they build) and :attr:`padded_columns`, and give :meth:`lengths` and
    :meth:`shapes`.
    """

    #: ``"sft"``, ``"prompt"`` or ``"preference"`` (:mod:`lit_rlhf.data.examples`)
    kind = ""
    #: column -> padding side, for the collator's trimming.
    padded_columns: dict[str, str] = {}

    def __init__(
        self,
        path: Optional[str],
        sources: Optional[list[Source]],
        format: str,
        tokenizer: str,
        batch_size: int,
        eval_batch_size: int,
        query_length: int,
        train_samples: Optional[int],
        val_samples: Optional[int],
        num_workers: int,
        seed: int,
        hub_config: Optional[str] = None,
        columns: Optional[Columns] = None,
        system_prompt: Optional[str] = None,
        long_responses: str = "drop",
        invalid_rows: str = "drop",
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_arguments(
            owner, locals(),
            positive=("batch_size", "eval_batch_size", "query_length", "train_samples", "val_samples"), non_negative=("num_workers",),
        )
        require(owner, (path is None) != (not sources), "set exactly one of data.path (one source) and data.sources (a mixture)")
        require(owner, invalid_rows in INVALID_ROWS, f"invalid_rows must be one of {INVALID_ROWS}, got '{invalid_rows}'")
        require(owner, long_responses in examples.LONG_RESPONSES,
                f"long_responses must be one of {examples.LONG_RESPONSES}, got '{long_responses}'")
        if path is not None:
            sources = [Source(path, format=format, hub_config=hub_config, **vars(columns or Columns()))]
        self.sources = [source if isinstance(source, Source) else Source(**dict(source)) for source in sources or []]
        names = [source.name for source in self.sources]
        require(owner, len(set(names)) == len(names), f"sources need distinct names, got {names}: set data.sources[].name")
        self.path, self.tokenizer_name = path, tokenizer
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.query_length = query_length
        self.train_samples, self.val_samples = train_samples, val_samples
        self.num_workers, self.seed = num_workers, seed
        self.system_prompt, self.long_responses, self.invalid_rows = system_prompt, long_responses, invalid_rows
        self.tokenizer: Any = None
        self.splits: dict[str, datasets.Dataset] = {}
        #: rows per source of each built split (after drops, caps and weights)
        self.source_counts: dict[str, dict[str, int]] = {}
        self.batch_names: list[str] = []
        self.source_names: list[str] = []
        #: each source's format, as read (detected or named)
        self.formats: dict[str, str] = {}

    # ------------------------------------------------------------------ building
    def lengths(self) -> Lengths:
        raise NotImplementedError

    def shapes(self) -> dict[str, set[int]]:
        raise NotImplementedError

    def _tokenizer(self) -> Any:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_name)
        return self.tokenizer

    def renderer(self) -> templates.Renderer:
        return templates.Renderer(self._tokenizer(), self.system_prompt)

    def _format(self, source: Source, split: str) -> str:
        """The source's format (detected from its split's first row where ``"auto"``), checked against :attr:`kind`.

        Raises:
            ValueError: naming the source when its format fits no format, or not this kind of DataModule.
        """
        keys = source.columns()
        if source.format != "auto":
            format = source.format
        else:
            directory = Path(source.path).expanduser()
            if directory.is_dir():
                file = directory / f"{split_file(source.split(split))}.jsonl"
                row = first_row(file)
                try:
                    format = formats.detect_format(row, row, keys)
                except ValueError as error:
                    raise ValueError(f"{file}: the first row {error}") from None
            else:
                data = load_split(source.path, source.split(split), (), source.hub_config)
                try:
                    format = formats.detect_format(data.column_names, data[0] if len(data) else None, keys)
                except ValueError as error:
                    raise ValueError(f"{source.path} ({split}): {error}") from None
        allowed = KIND_FORMATS[self.kind]
        if format not in allowed:
            raise ValueError(
                f"{source.path}: {format} rows cannot feed {type(self).__name__} (it reads {', '.join(allowed)}); "
                "set the source's format if it was detected wrongly"
            )
        return format

    def build_source(self, source: Source, split: str, limit: Optional[int] = None) -> datasets.Dataset:
        """The examples of one source's split: loaded (each local line validated), formatted, rows that do not fit
        dropped and counted, capped to ``limit`` (else the source's, else the DataModule's ``*_samples``)."""
        format = self.formats[source.name] = self._format(source, split)
        keys = source.columns()
        required = formats.required_columns(format, keys)
        data = load_split(source.path, source.split(split), required, source.hub_config, _row_checker(format, keys, self.invalid_rows))
        if limit is None:
            limit = (source.train_samples or self.train_samples) if split == "train" else (source.val_samples or self.val_samples)
        if limit is not None:
            data = data.select(range(min(limit, len(data))))
        builder = partial(_build_row, format=format, keys=keys, kind=self.kind, renderer=self.renderer(),
                          lengths=self.lengths(), source=source.name)
        columns = {"sft": examples.SFT_COLUMNS, "prompt": examples.PROMPT_COLUMNS, "preference": examples.PREFERENCE_COLUMNS}[self.kind]
        built = _build(data, builder, f"{source.name}/{split}", source.path, self.shapes(), columns, self.invalid_rows)
        if split == "train" and source.weight is not None:
            count = round(source.weight * len(built))
            built = built.select([index % len(built) for index in range(count)])
        return built

    def build(self, split: str, limit: Optional[int] = None) -> datasets.Dataset:
        """The examples of ``split`` over every source, concatenated in the order of :attr:`sources`; the rows per source
        go to :attr:`source_counts` (and the log for a mixture)."""
        parts = [self.build_source(source, split, limit) for source in self.sources]
        self.source_counts[split] = {source.name: len(part) for source, part in zip(self.sources, parts)}
        if len(parts) > 1:
            counts = ", ".join(f"{n} rows of {name}" for name, n in self.source_counts[split].items())
            log.info("%s %s: %s", type(self).__name__, split, counts)
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)

    @property
    def task(self) -> str:
        """``"summarization"`` when every source is TL;DR data (its judges read a post and two summaries), else
        ``"chat"`` (a conversation and two answers); known once a split is built."""
        return "summarization" if all(f.startswith("tldr") for f in self.formats.values()) else "chat"

    def _name_groups(self) -> None:
        """:attr:`batch_names` and :attr:`source_names`: the sorted names over every built split (their indices are
        the ``batch`` / ``source`` tensors of a batch)."""
        for column, attribute in (("batch", "batch_names"), ("source", "source_names")):
            names = set()
            for data in self.splits.values():
                if column in data.column_names:
                    names.update(data.unique(column))
            setattr(self, attribute, sorted(names))

    def sft_sequences(self, path: str, limit: Optional[int], response_length: int, max_length: int) -> datasets.Dataset:
        """(prompt + reference) training rows of the SFT data at ``path`` as ``input_ids`` (R5 normalisation, PPO-ptx)."""
        sft = SFTDataModule(path, self.tokenizer_name, self.query_length, response_length, max_length, seed=self.seed,
                            system_prompt=self.system_prompt)
        sft.tokenizer = self._tokenizer()
        return sft.build("train", limit).remove_columns(["query_ids", "loss_mask", "source"])

    # ------------------------------------------------------------------ batches
    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Stack ``*_ids`` columns into ``(B, L)`` long tensors (rows of different fixed shapes, e.g. TL;DR and CNN/DM
        comparisons, padded to the widest on the column's side), trimming all-pad columns; ``loss_mask`` as ``input_ids``
        (0 where padded); ``batch`` and ``source`` names as indices into :attr:`batch_names` / :attr:`source_names`;
        other integers as tensors; the rest as lists."""
        pad_id = self._tokenizer().pad_token_id
        batch: dict[str, Any] = {}
        for key in rows[0]:
            values = [row[key] for row in rows]
            if key.endswith("_ids"):
                side, width = self.padded_columns[key], max(len(ids) for ids in values)
                values = [pad(ids, width, pad_id, side) for ids in values]
                batch[key] = trim_padding(torch.tensor(values, dtype=torch.long), pad_id, side)
            elif key == "loss_mask":
                width = max(len(mask) for mask in values)
                batch[key] = torch.tensor([pad(mask, width, 0, "right") for mask in values], dtype=torch.bool)
            elif key in ("batch", "source") and getattr(self, f"{key}_names"):
                names = getattr(self, f"{key}_names")
                batch[key] = torch.tensor([names.index(name) for name in values], dtype=torch.long)
            elif isinstance(values[0], int):
                batch[key] = torch.tensor(values, dtype=torch.long)
            else:
                batch[key] = values
        if "loss_mask" in batch:
            batch["loss_mask"] = batch["loss_mask"][:, : batch["input_ids"].size(1)]
        return batch

    def _loader(self, data: datasets.Dataset, batch_size: int, shuffle: bool = False, sampler: Optional[Sampler] = None) -> DataLoader:
        """A resumable loader: torchdata's ``StatefulDataLoader``, whose position Lightning saves in every checkpoint
        and restores on resume; ``shuffle`` uses :class:`EpochShuffleSampler` (seeded, resumable mid-epoch)."""
        if shuffle:
            sampler = EpochShuffleSampler(len(data), self.seed)
        return StatefulDataLoader(data, batch_size=batch_size, sampler=sampler, collate_fn=self.collate, num_workers=self.num_workers)

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit"):
            self.splits.setdefault("train", self.build("train"))
        self.splits.setdefault("validation", self.build("validation"))
        self._name_groups()

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.splits["train"], self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.splits["validation"], self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.splits.get("test", self.splits["validation"]), self.eval_batch_size)


#: the arguments every DataModule documents the same way
_COMMON_ARGS = """
        path: one source: a directory with ``train.jsonl``/``validation.jsonl``, or a hub dataset name.
        sources: a mixture instead of ``path``: a list of :class:`Source` (each its own path, format, columns, row cap
            or weight); validation metrics are reported per source.
        format: the format of ``path`` (``"auto"``: detected from the columns; see :mod:`lit_rlhf.data.formats`).
        hub_config: the hub dataset's configuration when ``path`` is a hub name.
        prompt_key, completion_key, chosen_key, rejected_key, messages_key, text_key, reference_key: the column
            names of ``path`` (as OpenRLHF's ``--input_key``; each source of a mixture has its own).
        tokenizer: model name or directory whose tokenizer to use (a ``[PAD]`` token is added where its pad token is
            missing or a stop token, recipe D6; linked to the stage's model by the CLI).
        system_prompt: a system message put first in every conversation that has none (``None``: the chat
            template's default).
        long_responses: ``"drop"`` rows whose response exceeds its budget (N+), ``"truncate"`` the response at its end,
            or ``"keep_end"``: cut its beginning, keeping its end-of-turn token (recipe W1; TRL's ``keep_end``).
        invalid_rows: ``"drop"`` rows with broken content (an empty turn, roles that do not alternate, a pair without a
            shared prompt, a prompt ending with an assistant turn), counted in one warning, or ``"error"``.
        query_length: prompt budget (clever truncation for TL;DR, recipe D3; the last turns of a conversation) and
            left-padding width (D4).
        batch_size / eval_batch_size: training / validation rows per batch and device.
        train_samples / val_samples: use only the first N rows of each source's split (``None`` = all).
        num_workers: DataLoader workers.
        seed: shuffling seed, shared by every rank."""


def _columns(prompt_key: str, completion_key: str, chosen_key: str, rejected_key: str, messages_key: str, text_key: str,
             reference_key: str) -> Columns:
    return Columns(prompt_key, completion_key, chosen_key, rejected_key, messages_key, text_key, reference_key)


class SFTDataModule(_DataModule):
    __doc__ = """A prompt and its target for SFT (recipe D1-D7 for TL;DR), in any SFT format.

    Batches hold ``input_ids`` ``(B, L)`` (prompt + target, right-padded; ``L <= max_length``), ``loss_mask``
    ``(B, L)`` bool (where the loss applies: the whole TL;DR sequence as N+; the completion of prompt-completion rows;
    every assistant turn of a conversation, template headers and user turns excluded), ``query_ids`` ``(B, Q)``
    (left-padded prompt for sampling), ``reference`` (list of str) and ``source`` ``(B,)``. Rows whose target exceeds
    ``response_length`` tokens are dropped (or cut, ``long_responses``), as in the N+ filtered dataset.

    Args:""" + _COMMON_ARGS + """
        response_length: maximum target length in tokens, EOS / end-of-turn included (recipe D7: 53).
        max_length: fixed length of prompt + target (recipe D7: 562); a conversation longer than it is dropped.
    """

    kind = "sft"
    padded_columns = {"input_ids": "right", "query_ids": "left"}

    def __init__(
        self,
        path: Optional[str] = "../shared/data/tldr/sft",
        tokenizer: str = "smollm2-135m",
        query_length: int = 512,
        response_length: int = 53,
        max_length: int = 562,
        batch_size: int = 8,
        eval_batch_size: int = 8,
        train_samples: Optional[int] = None,
        val_samples: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 1,
        sources: Optional[list[Source]] = None,
        format: str = "auto",
        hub_config: Optional[str] = None,
        system_prompt: Optional[str] = None,
        long_responses: str = "drop",
        invalid_rows: str = "drop",
        prompt_key: str = "prompt",
        completion_key: str = "completion",
        chosen_key: str = "chosen",
        rejected_key: str = "rejected",
        messages_key: str = "messages",
        text_key: str = "text",
        reference_key: str = "reference",
    ) -> None:
        columns = _columns(prompt_key, completion_key, chosen_key, rejected_key, messages_key, text_key, reference_key)
        super().__init__(
            path, sources, format, tokenizer, batch_size, eval_batch_size, query_length, train_samples, val_samples,
            num_workers, seed, hub_config, columns, system_prompt, long_responses, invalid_rows,
        )
        check_arguments(type(self).__name__, locals(), positive=("response_length", "max_length"))
        self.response_length, self.max_length = response_length, max_length

    def lengths(self) -> Lengths:
        """The token lengths (query, response, whole row) every example is cut or padded to."""
        return Lengths(self.query_length, self.response_length, self.max_length, self.long_responses)

    def shapes(self) -> dict[str, set[int]]:
        """The widths (tokens) each batch key may have: ``query_ids`` ``(B, query_length)``, ``input_ids``
        ``(B, max_length)``."""
        return {"query_ids": {self.query_length}, "input_ids": {self.max_length}}


class PromptDataModule(_DataModule):
    __doc__ = """Prompts only, for PPO and online-DPO rollouts and for ``eval``: left-padded, reshuffled and repeated
    (recipe D4, P9). Any format gives prompts: a preference row its prompt (the chosen response as reference), a
    conversation the turns before its last assistant turn.

    Batches hold ``query_ids`` ``(B, Q)``, ``reference`` (list of str, ``""`` without one), ``reference_ids`` ``(B, R)``
    (the reference rendered as a response, for the reward model's win rate against it), ``prompt_text`` (what a judge
    reads) and ``source`` ``(B,)``. The training loader yields ``total_episodes`` prompts in all (fresh permutations of
    the training rows one after another; with several ranks Lightning shards this stream), so one epoch of it is the
    whole PPO run.

    With ``ptx_batch_size > 0`` (PPO-ptx, recipe §2) each training batch is ``{"prompts": ..., "ptx": ...}``,
    ``ptx`` holding ``input_ids`` ``(b, L)`` (prompt + reference) rows of the SFT training data at ``ptx_path``,
    reshuffled and repeated; the number of updates stays that of the prompts.

    Online iterative DPO runs one iteration per epoch with ``total_episodes`` prompts: epoch ``e`` takes the
    ``e``-th block of the same shuffled stream (:meth:`RepeatedShuffleSampler.set_epoch`).

    Args:""" + _COMMON_ARGS + """
        response_length: the reference's budget (TL;DR rows whose reference exceeds it are dropped, as SFT's).
        max_length: the budget of prompt + reference (recipe D7: 562).
        reference_length: a separate budget for reference answers (``None``: ``response_length`` and ``max_length``);
            chat references (MT-Bench: median 364 tokens) are longer than the responses sampled in training.
        total_episodes: prompts sampled over the run (recipe P9: 1,000,000), or per epoch; ``batch_size`` of
            them per update and rank.
        ptx_batch_size: SFT rows per update for PPO-ptx (0 = none).
        ptx_path: SFT data for PPO-ptx (``None`` = ``path``).
        ptx_samples: use only the first N of its training rows (``None`` = all).
    """

    kind = "prompt"
    padded_columns = {"query_ids": "left", "reference_ids": "right", "input_ids": "right"}

    def __init__(
        self,
        path: Optional[str] = "../shared/data/tldr/sft",
        tokenizer: str = "smollm2-135m",
        query_length: int = 512,
        response_length: int = 53,
        max_length: int = 562,
        batch_size: int = 64,
        eval_batch_size: int = 64,
        total_episodes: int = 1_000_000,
        train_samples: Optional[int] = None,
        val_samples: Optional[int] = None,
        ptx_batch_size: int = 0,
        ptx_path: Optional[str] = None,
        ptx_samples: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 1,
        sources: Optional[list[Source]] = None,
        format: str = "auto",
        hub_config: Optional[str] = None,
        system_prompt: Optional[str] = None,
        long_responses: str = "drop",
        invalid_rows: str = "drop",
        reference_length: Optional[int] = None,
        prompt_key: str = "prompt",
        completion_key: str = "completion",
        chosen_key: str = "chosen",
        rejected_key: str = "rejected",
        messages_key: str = "messages",
        text_key: str = "text",
        reference_key: str = "reference",
    ) -> None:
        columns = _columns(prompt_key, completion_key, chosen_key, rejected_key, messages_key, text_key, reference_key)
        super().__init__(
            path, sources, format, tokenizer, batch_size, eval_batch_size, query_length, train_samples, val_samples,
            num_workers, seed, hub_config, columns, system_prompt, long_responses, invalid_rows,
        )
        check_arguments(
            type(self).__name__, locals(),
            positive=("response_length", "max_length", "total_episodes", "ptx_samples", "reference_length"),
            non_negative=("ptx_batch_size",),
        )
        require(
            type(self).__name__, total_episodes >= batch_size,
            f"total_episodes={total_episodes} is smaller than batch_size={batch_size}: not one update's worth of prompts",
        )
        self.response_length, self.max_length, self.reference_length = response_length, max_length, reference_length
        self.total_episodes = total_episodes
        self.ptx_batch_size, self.ptx_path, self.ptx_samples = ptx_batch_size, ptx_path, ptx_samples

    def lengths(self) -> Lengths:
        """The token lengths (query, response, whole row, reference answer) every example is cut or padded to."""
        return Lengths(self.query_length, self.response_length, self.max_length, self.long_responses,
                       reference_length=self.reference_length)

    def shapes(self) -> dict[str, set[int]]:
        """The widths (tokens) each batch key may have: ``query_ids`` ``(B, query_length)``, ``reference_ids``
        ``(B, reference_length or response_length)``."""
        return {"query_ids": {self.query_length}, "reference_ids": {self.reference_length or self.response_length}}

    def setup(self, stage: Optional[str] = None) -> None:
        super().setup(stage)
        if stage in (None, "fit") and self.ptx_batch_size > 0:
            ptx_path = self.ptx_path or self.path
            require(type(self).__name__, ptx_path is not None, "PPO-ptx with data.sources needs data.ptx_path")
            ptx = self.sft_sequences(ptx_path, self.ptx_samples, self.response_length, self.max_length)
            self.splits.setdefault("ptx", ptx)

    def train_dataloader(self) -> Any:
        train = self.splits["train"]
        prompts = self._loader(train, self.batch_size, sampler=RepeatedShuffleSampler(len(train), self.total_episodes, self.seed))
        if self.ptx_batch_size <= 0:
            return prompts
        # as many ptx batches as prompt batches, reshuffled and repeated: the prompts alone set the run's length
        ptx_rows = len(prompts) * self.ptx_batch_size
        ptx_sampler = RepeatedShuffleSampler(len(self.splits["ptx"]), ptx_rows, self.seed)
        ptx = self._loader(self.splits["ptx"], self.ptx_batch_size, sampler=ptx_sampler)
        return CombinedLoader({"prompts": prompts, "ptx": ptx}, mode="min_size")


class PreferenceDataModule(_DataModule):
    __doc__ = """Chosen/rejected pairs (recipe D1, D5, D7, R4-R6; W1-W2), in any preference format.

    Batches hold ``chosen_ids``/``rejected_ids`` ``(B, L)`` (prompt + response, right-padded; both after the same
    prompt tokens), ``query_ids`` ``(B, Q)``, ``chosen_response_ids``/``rejected_response_ids`` ``(B, T)`` (the responses
    alone, right-padded, for DPO), ``batch`` ``(B,)`` (index into :attr:`batch_names`: OpenAI's comparison batch, else the
    row's own ``source`` column), ``confidence`` ``(B,)`` (labeller confidence 1-9, -1 when absent) and ``source``
    ``(B,)`` (index into :attr:`source_names`; CNN/DM articles are ``{source}/cnndm``, with the CNN/DM template and query
    budget, recipe D2, D3). Pairs whose two responses are the same tokens are dropped and counted. For the reward
    normalisation of recipe R5, :meth:`normalization_dataloader` serves SFT (prompt + reference) sequences from
    ``sft_path``.

    Args:""" + _COMMON_ARGS + """
        response_length: maximum response length, EOS / end-of-turn included (recipe D7: 169).
        max_length: fixed length of prompt + response (recipe D7: 638).
        cnndm_query_length: query budget of CNN/DM rows (recipe D3: 1,919).
        cnndm_max_length: fixed length of a CNN/DM query + summary (``None`` = ``cnndm_query_length + response_length``).
        sft_path: SFT data for the reward normalisation (recipe R5); ``None`` disables it.
        normalization_samples: number of SFT training rows used for R5 (``None`` = all).
        sft_response_length / sft_max_length: SFT shapes for those rows (53 / 562).
    """

    kind = "preference"
    padded_columns = {
        "chosen_ids": "right", "rejected_ids": "right", "query_ids": "left", "input_ids": "right",
        "chosen_response_ids": "right", "rejected_response_ids": "right",
    }

    def __init__(
        self,
        path: Optional[str] = "../shared/data/tldr/comparisons",
        tokenizer: str = "smollm2-135m",
        hub_config: Optional[str] = None,
        query_length: int = 512,
        response_length: int = 169,
        max_length: int = 638,
        cnndm_query_length: int = CNNDM_QUERY_LENGTH,
        cnndm_max_length: Optional[int] = None,
        batch_size: int = 8,
        eval_batch_size: int = 8,
        train_samples: Optional[int] = None,
        val_samples: Optional[int] = None,
        sft_path: Optional[str] = "../shared/data/tldr/sft",
        normalization_samples: Optional[int] = None,
        sft_response_length: int = 53,
        sft_max_length: int = 562,
        num_workers: int = 0,
        seed: int = 1,
        sources: Optional[list[Source]] = None,
        format: str = "auto",
        system_prompt: Optional[str] = None,
        long_responses: str = "drop",
        invalid_rows: str = "drop",
        prompt_key: str = "prompt",
        completion_key: str = "completion",
        chosen_key: str = "chosen",
        rejected_key: str = "rejected",
        messages_key: str = "messages",
        text_key: str = "text",
        reference_key: str = "reference",
    ) -> None:
        columns = _columns(prompt_key, completion_key, chosen_key, rejected_key, messages_key, text_key, reference_key)
        super().__init__(
            path, sources, format, tokenizer, batch_size, eval_batch_size, query_length, train_samples, val_samples,
            num_workers, seed, hub_config, columns, system_prompt, long_responses, invalid_rows,
        )
        check_arguments(
            type(self).__name__, locals(),
            positive=("response_length", "max_length", "cnndm_query_length", "cnndm_max_length", "normalization_samples",
                      "sft_response_length", "sft_max_length"),
        )
        self.response_length, self.max_length = response_length, max_length
        self.cnndm_query_length = cnndm_query_length
        self.cnndm_max_length = cnndm_max_length if cnndm_max_length is not None else cnndm_query_length + response_length
        self.sft_path, self.normalization_samples = sft_path, normalization_samples
        self.sft_response_length, self.sft_max_length = sft_response_length, sft_max_length

    def lengths(self) -> Lengths:
        """The token lengths every comparison is cut or padded to (TL;DR and CNN/DM queries and rows apart)."""
        return Lengths(self.query_length, self.response_length, self.max_length, self.long_responses,
                       self.cnndm_query_length, self.cnndm_max_length)

    def shapes(self) -> dict[str, set[int]]:
        """The widths (tokens) each batch key may have: queries, whole chosen/rejected rows and their responses."""
        sequences, responses = {self.max_length, self.cnndm_max_length}, {self.response_length}
        return {
            "query_ids": {self.query_length, self.cnndm_query_length}, "chosen_ids": sequences, "rejected_ids": sequences,
            "chosen_response_ids": responses, "rejected_response_ids": responses,
        }

    def normalization_dataloader(self) -> DataLoader:
        """SFT training rows as ``input_ids`` (prompt + reference) for the reward bias of recipe R5.

        Raises:
            ValueError: when ``sft_path`` is ``None``.
        """
        if self.sft_path is None:
            raise ValueError("reward normalisation (recipe R5) needs data.sft_path")
        data = self.sft_sequences(self.sft_path, self.normalization_samples, self.sft_response_length, self.sft_max_length)
        return self._loader(data, self.eval_batch_size)
