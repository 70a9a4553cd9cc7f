"""LightningDataModules for the three kinds of TL;DR data (recipe D1-D8).

* :class:`SFTDataModule`: query + reference summary (supervised fine-tuning).
* :class:`PromptDataModule`: left-padded queries only, reshuffled and repeated (PPO rollouts, recipe P9).
* :class:`PreferenceDataModule`: OpenAI comparisons as chosen/rejected pairs (reward model, DPO).

Each reads a local directory holding ``train.jsonl`` / ``validation.jsonl`` (the shared sample) or a hub
dataset with the same columns, through ``datasets``. Examples are built with fixed shapes (asserted; CNN/DM
comparisons have their own, recipe D3); batches pad rows of different fixed shapes to the widest, then drop
the columns that are padding in every row, which is exact because positions are derived from the
attention mask.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections import Counter
from functools import partial
from typing import Any, Callable, Iterator, Optional

import datasets
import lightning as L
import torch
from datasets.fingerprint import Hasher
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from lit_rlhf.arguments import check_arguments, require
from lit_rlhf.data import formatting
from lit_rlhf.data.formatting import CNNDM_QUERY_LENGTH, build_preference_example, build_sft_example, pad, trim_padding
from lit_rlhf.data.io import load_split
from lit_rlhf.models.loading import load_tokenizer

log = logging.getLogger(__name__)

SFT_FIELDS = ("subreddit", "title", "post", "summary")
COMPARISON_FIELDS = ("info", "summaries", "choice")


#: why ``_build`` dropped a row: its code in the ``drop`` column and the wording of the warning
DROP_REASONS = {1: "whose response exceeds the fixed length", 2: "whose query does not fit its budget even with an empty post"}


#: formatting runs in several processes only for splits of at least this many rows per process, and in at most
#: MAX_FORMAT_PROCESSES
MIN_ROWS_PER_PROCESS = 256
MAX_FORMAT_PROCESSES = 8


def _build(
    split: datasets.Dataset, builder: Callable, what: str, source: str, shapes: dict[str, set[int]], columns: tuple[str, ...]
) -> datasets.Dataset:
    """Map rows through ``builder``, drop the rows it rejects, warn with the count of each reason, assert the fixed
    shapes (recipe D7): every ``*_ids`` column's length is one of ``shapes[column]`` (checked on the first 64 rows).

    ``builder`` returns the example (a dict with ``columns``), ``None`` for a response that is too long, or raises
    :class:`~lit_rlhf.data.formatting.QueryTooLong` for a query that does not fit even with an empty body (a title
    alone too long): both rows are dropped, not the run.

    Raises:
        ValueError: naming the source and the row id, for a row with a missing or invalid field; naming the source,
            when no row is left.
    """

    def build_rows(rows: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {column: [] for column in (*columns, "drop")}
        for index in range(len(next(iter(rows.values())))):
            row = {key: values[index] for key, values in rows.items()}
            try:
                example, drop = builder(row), 0
            except formatting.QueryTooLong:
                example, drop = None, 2
            except (KeyError, ValueError) as error:
                row_id = row.get("id") or (row.get("info") or {}).get("id")
                raise ValueError(f"{source} ({what}), row id={row_id}: {error}") from None
            if example is None:
                drop = drop or 1
            for column in columns:
                out[column].append(example[column] if example is not None else None)
            out["drop"].append(drop)
        return out

    # datasets fingerprints module-level functions by name: add the formatting code itself so that a changed
    # template or layout never reuses a stale cache
    fingerprint = Hasher.hash([split._fingerprint, what, inspect.getsource(formatting), builder, columns])
    # clever truncation tokenises a query once per dropped character (~35 ms a row): large splits are formatted by
    # one process per core (the rows are independent; the cache is the same for any number of processes)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    num_proc = min(cores, MAX_FORMAT_PROCESSES, len(split) // MIN_ROWS_PER_PROCESS)
    built = split.map(
        build_rows, batched=True, batch_size=MIN_ROWS_PER_PROCESS, remove_columns=split.column_names, desc=f"formatting {what}",
        new_fingerprint=fingerprint, num_proc=num_proc if num_proc > 1 else None,
    )
    drops = Counter(built["drop"])
    if len(drops) > 1 or 0 not in drops:
        counts = ", ".join(f"{drops[code]} {reason}" for code, reason in DROP_REASONS.items() if drops[code])
        log.warning("%s: dropped %d of %d rows: %s", what, len(split) - drops[0], len(split), counts)
        built = built.filter(lambda codes: [code == 0 for code in codes], input_columns="drop", batched=True)
    built = built.remove_columns("drop")
    if len(built) == 0:
        raise ValueError(f"{source}: no {what} row fits the configured lengths")
    for column in built.column_names:
        if column.endswith("_ids"):
            lengths = {len(ids) for ids in built[:64][column]}
            assert lengths <= shapes[column], f"{what}.{column} has lengths {lengths}, expected {shapes[column]}"  # recipe D7
    return built


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


class _TLDRDataModule(L.LightningDataModule):
    """Shared loading, subsetting and collation of the TL;DR DataModules."""

    #: column -> padding side, for the collator's trimming.
    padded_columns: dict[str, str] = {}

    def __init__(
        self,
        path: str,
        tokenizer: str,
        batch_size: int,
        eval_batch_size: int,
        query_length: int,
        train_samples: Optional[int],
        val_samples: Optional[int],
        num_workers: int,
        seed: int,
    ) -> None:
        super().__init__()
        check_arguments(
            type(self).__name__, locals(),
            positive=("batch_size", "eval_batch_size", "query_length", "train_samples", "val_samples"), non_negative=("num_workers",),
        )
        self.path, self.tokenizer_name = path, tokenizer
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.query_length = query_length
        self.train_samples, self.val_samples = train_samples, val_samples
        self.num_workers, self.seed = num_workers, seed
        self.tokenizer: Any = None
        self.splits: dict[str, datasets.Dataset] = {}

    def _load(
        self, split: str, required: tuple[str, ...], limit: Optional[int], hub_config: Optional[str] = None,
        check: Optional[Callable] = None,
    ) -> datasets.Dataset:
        data = load_split(self.path, split, required, hub_config, check)
        return data.select(range(min(limit, len(data)))) if limit is not None else data

    def _tokenizer(self) -> Any:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_name)
        return self.tokenizer

    def sft_sequences(self, path: str, limit: Optional[int], response_length: int, max_length: int) -> datasets.Dataset:
        """(query + reference) training rows of the SFT data at ``path`` as ``input_ids`` (R5 normalisation, PPO-ptx)."""
        sft = SFTDataModule(path, self.tokenizer_name, self.query_length, response_length, max_length, seed=self.seed)
        sft.tokenizer = self._tokenizer()
        return sft.build("train", limit).remove_columns(["query_ids"])

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Stack ``*_ids`` columns into ``(B, L)`` long tensors (rows of different fixed shapes, e.g. TL;DR and CNN/DM
        comparisons, padded to the widest on the column's side), trimming all-pad columns; keep the rest as lists."""
        pad_id = self._tokenizer().pad_token_id
        batch: dict[str, Any] = {}
        for key in rows[0]:
            values = [row[key] for row in rows]
            if key.endswith("_ids"):
                side, width = self.padded_columns[key], max(len(ids) for ids in values)
                values = [pad(ids, width, pad_id, side) for ids in values]
                batch[key] = trim_padding(torch.tensor(values, dtype=torch.long), pad_id, side)
            elif isinstance(values[0], int):
                batch[key] = torch.tensor(values, dtype=torch.long)
            else:
                batch[key] = values
        return batch

    def _loader(self, data: datasets.Dataset, batch_size: int, shuffle: bool = False, sampler: Optional[Sampler] = None) -> DataLoader:
        """A resumable loader: torchdata's ``StatefulDataLoader``, whose position Lightning saves in every checkpoint
        and restores on resume; ``shuffle`` uses :class:`EpochShuffleSampler` (seeded, resumable mid-epoch)."""
        if shuffle:
            sampler = EpochShuffleSampler(len(data), self.seed)
        return StatefulDataLoader(data, batch_size=batch_size, sampler=sampler, collate_fn=self.collate, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.splits["validation"], self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.splits.get("test", self.splits["validation"]), self.eval_batch_size)


class SFTDataModule(_TLDRDataModule):
    """Query + reference summary for SFT (recipe D1-D7).

    Batches hold ``input_ids`` ``(B, L)`` (query + " summary" + EOS, right-padded; ``L <= max_length``),
    ``query_ids`` ``(B, Q)`` (left-padded prompt for sampling; ``Q <= query_length``) and ``reference`` (list of
    str). Rows whose reference exceeds ``response_length`` tokens are dropped, as in the N+ filtered dataset.

    Args:
        path: directory with ``train.jsonl``/``validation.jsonl`` or a hub dataset name.
        tokenizer: model name or directory whose tokenizer to use (a ``[PAD]`` token is added, recipe D6).
        query_length: query budget for clever truncation and left padding (recipe D3/D4: 512).
        response_length: maximum reference length in tokens, EOS included (recipe D7: 53).
        max_length: fixed length of query + reference (recipe D7: 562).
        batch_size: training batch size per device.
        eval_batch_size: validation batch size per device.
        train_samples: use only the first N training rows (``None`` = all).
        val_samples: use only the first N validation rows.
        num_workers: DataLoader workers.
        seed: shuffling seed, shared by every rank.
    """

    padded_columns = {"input_ids": "right", "query_ids": "left"}

    def __init__(
        self,
        path: str = "../shared/data/tldr/sft",
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
    ) -> None:
        super().__init__(path, tokenizer, batch_size, eval_batch_size, query_length, train_samples, val_samples, num_workers, seed)
        check_arguments(type(self).__name__, locals(), positive=("response_length", "max_length"))
        self.response_length, self.max_length = response_length, max_length

    def build(self, split: str, limit: Optional[int]) -> datasets.Dataset:
        builder = partial(
            build_sft_example,
            tokenizer=self._tokenizer(),
            query_length=self.query_length,
            response_length=self.response_length,
            max_length=self.max_length,
        )
        shapes = {"query_ids": {self.query_length}, "input_ids": {self.max_length}}
        return _build(self._load(split, SFT_FIELDS, limit), builder, f"sft/{split}", self.path, shapes, formatting.SFT_COLUMNS)

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit"):
            self.splits.setdefault("train", self.build("train", self.train_samples))
        self.splits.setdefault("validation", self.build("validation", self.val_samples))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.splits["train"], self.batch_size, shuffle=True)


class PromptDataModule(SFTDataModule):
    """Queries only, for PPO rollouts: left-padded, reshuffled and repeated (recipe D4, P9).

    Batches hold ``query_ids`` ``(B, Q)`` and ``reference`` (list of str). The training loader yields
    ``total_episodes`` prompts in all (fresh permutations of the training rows one after another; with
    several ranks Lightning shards this stream), so one epoch of it is the whole PPO run.

    With ``ptx_batch_size > 0`` (PPO-ptx, recipe §2) each training batch is ``{"prompts": ..., "ptx": ...}``,
    ``ptx`` holding ``input_ids`` ``(b, L)`` (query + reference) rows of the SFT training data at ``ptx_path``,
    reshuffled and repeated; the number of updates stays that of the prompts.

    Online iterative DPO runs one iteration per epoch with ``total_episodes`` prompts: epoch ``e`` takes the
    ``e``-th block of the same shuffled stream (:meth:`RepeatedShuffleSampler.set_epoch`).

    Args:
        total_episodes: prompts sampled over the run (recipe P9: 1,000,000), or per epoch; ``batch_size`` of
            them per update and rank.
        ptx_batch_size: SFT rows per update for PPO-ptx (0 = none).
        ptx_path: SFT data for PPO-ptx (``None`` = ``path``).
        ptx_samples: use only the first N of its training rows (``None`` = all).
        (others): as :class:`SFTDataModule`.
    """

    padded_columns = {"query_ids": "left", "input_ids": "right"}

    def __init__(
        self,
        path: str = "../shared/data/tldr/sft",
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
    ) -> None:
        super().__init__(
            path, tokenizer, query_length, response_length, max_length,
            batch_size, eval_batch_size, train_samples, val_samples, num_workers, seed,
        )
        check_arguments(type(self).__name__, locals(), positive=("total_episodes", "ptx_samples"), non_negative=("ptx_batch_size",))
        require(
            type(self).__name__, total_episodes >= batch_size,
            f"total_episodes={total_episodes} is smaller than batch_size={batch_size}: not one update's worth of prompts",
        )
        self.total_episodes = total_episodes
        self.ptx_batch_size, self.ptx_path, self.ptx_samples = ptx_batch_size, ptx_path, ptx_samples

    def build(self, split: str, limit: Optional[int]) -> datasets.Dataset:
        return super().build(split, limit).remove_columns("input_ids")

    def setup(self, stage: Optional[str] = None) -> None:
        super().setup(stage)
        if stage in (None, "fit") and self.ptx_batch_size > 0:
            ptx = self.sft_sequences(self.ptx_path or self.path, self.ptx_samples, self.response_length, self.max_length)
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


class PreferenceDataModule(_TLDRDataModule):
    """OpenAI comparisons as chosen/rejected pairs (recipe D1, D5, D7; R4-R6).

    Batches hold ``chosen_ids``/``rejected_ids`` ``(B, L)`` (query + summary + EOS, right-padded),
    ``query_ids`` ``(B, Q)``, ``chosen_response_ids``/``rejected_response_ids`` ``(B, T)`` (summary + EOS alone,
    right-padded, for DPO), ``batch`` ``(B,)`` (index into :attr:`batch_names`) and ``confidence`` ``(B,)``
    (labeller confidence 1-9, -1 when absent). ``choice`` selects the chosen summary; rows with an ``info.article``
    use the CNN/DM template and query budget (recipe D2, D3). For the reward normalisation of recipe R5, :meth:`normalization_dataloader`
    serves SFT (query + reference) sequences from ``sft_path``.

    Args:
        path: directory with the comparisons' ``train.jsonl``/``validation.jsonl``, or ``openai/summarize_from_feedback``.
        hub_config: the hub configuration (``comparisons``) when ``path`` is a hub name.
        response_length: maximum summary length, EOS included (recipe D7: 169).
        max_length: fixed length of query + summary (recipe D7: 638).
        cnndm_query_length: query budget of CNN/DM rows (recipe D3: 1,919).
        cnndm_max_length: fixed length of a CNN/DM query + summary (``None`` = ``cnndm_query_length + response_length``).
        sft_path: SFT data for the reward normalisation (recipe R5); ``None`` disables it.
        normalization_samples: number of SFT training rows used for R5 (``None`` = all).
        sft_response_length / sft_max_length: SFT shapes for those rows (53 / 562).
        (others): as :class:`SFTDataModule`.
    """

    padded_columns = {
        "chosen_ids": "right", "rejected_ids": "right", "query_ids": "left", "input_ids": "right",
        "chosen_response_ids": "right", "rejected_response_ids": "right",
    }

    def __init__(
        self,
        path: str = "../shared/data/tldr/comparisons",
        tokenizer: str = "smollm2-135m",
        hub_config: Optional[str] = "comparisons",
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
    ) -> None:
        super().__init__(path, tokenizer, batch_size, eval_batch_size, query_length, train_samples, val_samples, num_workers, seed)
        check_arguments(
            type(self).__name__, locals(),
            positive=("response_length", "max_length", "cnndm_query_length", "cnndm_max_length", "normalization_samples",
                      "sft_response_length", "sft_max_length"),
        )
        self.hub_config, self.response_length, self.max_length = hub_config, response_length, max_length
        self.cnndm_query_length = cnndm_query_length
        self.cnndm_max_length = cnndm_max_length if cnndm_max_length is not None else cnndm_query_length + response_length
        self.sft_path, self.normalization_samples = sft_path, normalization_samples
        self.sft_response_length, self.sft_max_length = sft_response_length, sft_max_length
        self.batch_names: list[str] = []

    def build(self, split: str, limit: Optional[int]) -> datasets.Dataset:
        builder = partial(
            build_preference_example,
            tokenizer=self._tokenizer(),
            query_length=self.query_length,
            response_length=self.response_length,
            max_length=self.max_length,
            cnndm_query_length=self.cnndm_query_length,
            cnndm_max_length=self.cnndm_max_length,
        )
        sequences, responses = {self.max_length, self.cnndm_max_length}, {self.response_length}
        shapes = {
            "query_ids": {self.query_length, self.cnndm_query_length}, "chosen_ids": sequences, "rejected_ids": sequences,
            "chosen_response_ids": responses, "rejected_response_ids": responses,
        }
        data = self._load(split, COMPARISON_FIELDS, limit, self.hub_config, formatting.comparison_problem)
        return _build(data, builder, f"comparisons/{split}", self.path, shapes, formatting.PREFERENCE_COLUMNS)

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit"):
            self.splits.setdefault("train", self.build("train", self.train_samples))
        self.splits.setdefault("validation", self.build("validation", self.val_samples))
        names = set()
        for data in self.splits.values():
            names.update(data.unique("batch"))
        self.batch_names = sorted(names)

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().collate(rows)
        if "batch" in batch:
            batch["batch"] = torch.tensor([self.batch_names.index(name) for name in batch["batch"]], dtype=torch.long)
        return batch

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.splits["train"], self.batch_size, shuffle=True)

    def normalization_dataloader(self) -> DataLoader:
        """SFT training rows as ``input_ids`` (query + reference) for the reward bias of recipe R5.

        Raises:
            ValueError: when ``sft_path`` is ``None``.
        """
        if self.sft_path is None:
            raise ValueError("reward normalisation (recipe R5) needs data.sft_path")
        data = self.sft_sequences(self.sft_path, self.normalization_samples, self.sft_response_length, self.sft_max_length)
        return self._loader(data, self.eval_batch_size)
