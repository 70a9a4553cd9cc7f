"""Helpers for the stage tests: quickstart configs shrunk for speed, run outputs (results, checkpoints)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from conftest import COMPARISON_DATA, ROOT, SFT_DATA

QUERY_LENGTH = 128
#: SFT shapes (recipe D7 with a 128-token query budget): reference <= 53 tokens.
SFT_RESPONSE_LENGTH = 53
SFT_MAX_LENGTH = QUERY_LENGTH + SFT_RESPONSE_LENGTH
#: comparison shapes: summary <= 169 tokens.
RM_RESPONSE_LENGTH = 169
RM_MAX_LENGTH = QUERY_LENGTH + RM_RESPONSE_LENGTH


def stage_config(
    stage: str,
    root: Path,
    model: Optional[dict[str, Any]] = None,
    data: Optional[dict[str, Any]] = None,
    trainer: Optional[dict[str, Any]] = None,
    name: Optional[str] = None,
) -> Path:
    """``configs/quickstart/{stage}.yaml`` with outputs under ``root`` and small data shapes, written to ``root``.

    ``model``, ``data`` and ``trainer`` update the corresponding sections after the defaults below.
    """
    config = yaml.safe_load((ROOT / "configs" / "quickstart" / f"{stage}.yaml").read_text())
    section = config["trainer"]
    section["default_root_dir"] = str(root / stage)
    section["logger"]["init_args"]["save_dir"] = str(root / "tensorboard")
    # one epoch unless the stage or the caller says otherwise (the quickstart RM's 2 epochs are its CV-chosen setting)
    section.update(precision="32-true", enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   max_epochs=1)
    if stage == "sft":
        config["data"].update(
            path=str(SFT_DATA), query_length=QUERY_LENGTH, response_length=SFT_RESPONSE_LENGTH, max_length=SFT_MAX_LENGTH,
            batch_size=2, eval_batch_size=2, train_samples=8, val_samples=4,
        )
        config["model"].update(response_length=8, rouge_batches=1, num_samples=2)
    elif stage in ("rm", "dpo"):
        config["data"].update(
            path=str(COMPARISON_DATA), query_length=QUERY_LENGTH, response_length=RM_RESPONSE_LENGTH, max_length=RM_MAX_LENGTH,
            batch_size=2, eval_batch_size=2, train_samples=8, val_samples=4,
            sft_path=str(SFT_DATA), normalization_samples=8, sft_response_length=SFT_RESPONSE_LENGTH, sft_max_length=SFT_MAX_LENGTH,
        )
        if stage == "dpo":
            config["data"]["sft_path"] = None
    elif stage in ("ppo", "ppo_max"):
        config["data"].update(
            path=str(SFT_DATA), query_length=QUERY_LENGTH, response_length=SFT_RESPONSE_LENGTH, max_length=SFT_MAX_LENGTH,
            batch_size=2, eval_batch_size=2, total_episodes=4, train_samples=8, val_samples=4,
        )
        config["model"].update(response_length=8, num_ppo_epochs=2, num_samples=2)
    elif stage == "online_dpo":
        config["data"].update(
            path=str(SFT_DATA), query_length=QUERY_LENGTH, response_length=SFT_RESPONSE_LENGTH, max_length=SFT_MAX_LENGTH,
            batch_size=3, eval_batch_size=2, total_episodes=3, train_samples=8, val_samples=2,
        )
        config["model"].update(response_length=6, samples_per_prompt=3, dpo_batch_size=2, num_samples=2)
        config["trainer"].update(max_epochs=2, check_val_every_n_epoch=2)
    else:
        raise ValueError(stage)
    section.update(trainer or {})
    config["model"]["trainable_layers"] = None  # the quickstart's value assumes SmolLM2's 30 blocks
    config["model"].update(model or {})
    config["data"].update(data or {})
    path = root / f"{name or stage}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def results(run_dir: Path) -> list[dict[str, Any]]:
    """The records :class:`lit_rlhf.callbacks.ValidationResults` appended to ``run_dir/results.jsonl``."""
    path = Path(run_dir) / "results.jsonl"
    assert path.is_file(), f"no results.jsonl in {run_dir}"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_record(run_dir: Path, fn: str) -> dict[str, Any]:
    records = [record for record in results(run_dir) if record["fn"] == fn]
    assert records, f"no '{fn}' record in {run_dir}/results.jsonl"
    return records[-1]


def last_checkpoint(root: Path, stage: str) -> Path:
    """The ``last.ckpt`` :class:`lit_rlhf.callbacks.StageCheckpoint` wrote in ``root/{stage}/checkpoints``."""
    path = root / stage / "checkpoints" / "last.ckpt"
    assert path.is_file(), f"no {path}"
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_finite(metrics: dict[str, float], *keys: str) -> None:
    for key in keys:
        assert key in metrics, f"metric {key} missing from {sorted(metrics)}"
        assert math.isfinite(metrics[key]), f"{key} = {metrics[key]}"


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a rendezvous or a local server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_processes(
    stage: str, config: Path, strategy: str, *args: str, devices: int = 2, accelerator: str = "cpu", launcher: str = "torchrun"
) -> str:
    """``lit-rlhf {stage} fit --config config`` on ``devices`` processes (CPU, or one GPU each) under ``strategy``; fails
    with the end of its output. ``strategy="auto"`` with one device is the single-device run, no process group.

    ``launcher="torchrun"`` starts every rank at once with ``torch.distributed.run`` (Lightning reads the ranks from its
    environment); ``launcher="lightning"`` starts rank 0 only and lets Lightning's launcher re-run the command line for
    the others (what ``--trainer.devices N`` does for a user), which imports everything once per rank in turn (~4 s
    more per run on 2 cores).

    Returns:
        the run's stdout + stderr.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cli = [
        "-m", "lit_rlhf.cli", stage, "fit", "--config", str(config),
        "--trainer.devices", str(devices), "--trainer.strategy", strategy, "--trainer.accelerator", accelerator, *args,
    ]
    if strategy == "auto" or launcher == "lightning":
        command = [sys.executable, *cli]
    elif launcher == "torchrun":
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(devices), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), *cli,
        ]
    else:
        raise ValueError(f"launcher must be 'torchrun' or 'lightning', not {launcher!r}")
    process = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    output = process.stdout + process.stderr
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-5000:]
    if strategy != "auto":
        assert f"Starting with {devices} processes" in output
    return output


def validation_queries(tokenizer_dir: Path, rows: int) -> torch.Tensor:
    """The first ``rows`` left-padded validation queries ``(rows, QUERY_LENGTH)`` of the shared TL;DR sample."""
    from lit_rlhf.data.datamodules import PromptDataModule

    data = PromptDataModule(
        path=str(SFT_DATA), tokenizer=str(tokenizer_dir), query_length=QUERY_LENGTH, response_length=SFT_RESPONSE_LENGTH,
        max_length=SFT_MAX_LENGTH, eval_batch_size=rows, val_samples=rows,
    )
    data.setup("validate")
    return next(iter(data.val_dataloader()))["query_ids"]


def until_first_stop(responses: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """``(B, T)`` bool: true up to and including the first stop id of each row of ``responses`` (all true without one),
    the tokens recipe P3 keeps."""
    stops = torch.isin(responses, torch.tensor(stop_ids))
    return (stops.long().cumsum(1) - stops.long()) == 0


def direct_kl(
    policy: torch.nn.Module, reference: torch.nn.Module, queries: torch.Tensor, responses: torch.Tensor,
    stop_ids: list[int], pad_token_id: int, temperature: float,
) -> torch.Tensor:
    """The KL of recipe P4 computed independently of ``lit_rlhf.models.forward``: ``(B,)`` sums over each response's
    tokens, up to its first stop id, of policy minus reference logprobs with logits divided by ``temperature``, from
    one plain forward of each model on ``[queries | responses]`` (``(B, Q)`` left-padded, ``(B, T)`` raw samples)."""
    real = until_first_stop(responses, stop_ids)
    ids = torch.cat([queries, responses.masked_fill(~real, pad_token_id)], dim=1)
    mask = ids != pad_token_id
    targets = responses.masked_fill(~real, 0).unsqueeze(2)

    def logprobs(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            logits = model(input_ids=ids.masked_fill(~mask, 0), attention_mask=mask.long(),
                           position_ids=(mask.long().cumsum(1) - 1).clamp(min=0)).logits
        scaled = logits[:, queries.size(1) - 1 : -1].double() / temperature
        return torch.log_softmax(scaled, dim=-1).gather(2, targets).squeeze(2)

    return ((logprobs(policy) - logprobs(reference)) * real).sum(1)


def record_sampling(monkeypatch: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Wrap the sampling of validation and ``lit-rlhf eval`` (``lit_rlhf.sampling.generate``) through
    ``monkeypatch``: every call's ``(queries, raw responses)`` goes to the returned list, in call order."""
    import lit_rlhf.sampling as sampling

    sampled = []
    real_generate = sampling.generate

    def record(model, queries, *args):
        responses = real_generate(model, queries, *args)
        sampled.append((queries, responses))
        return responses

    monkeypatch.setattr(sampling, "generate", record)
    return sampled
