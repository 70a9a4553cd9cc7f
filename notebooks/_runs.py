"""The runs the evaluation notebooks look at: the quickstart's exports, or a small real run made here.

``runs(project)`` returns the quickstart's SFT, RM and PPO exports (plus DPO, online DPO and PPO's periodic exports
when present) from ``runs/quickstart`` once ``make quickstart`` has run. Without them, or with
``LIT_RLHF_NOTEBOOK_RUN=small`` (the notebook test in CI), it trains the same three stages through the ``lit-rlhf``
CLI on the real TL;DR files with a tiny random-init model (2 blocks of width 64, SmolLM2's tokenizer) into
``runs/notebook_small`` (about a minute on 2 cores, reused afterwards): the figures are then those of a toy model
on real data, the code paths those of the real run.
"""

from __future__ import annotations

import os
from pathlib import Path


def _tiny_model(directory: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from lit_rlhf.models.loading import convert_default_model

    if not (directory / "config.json").is_file():
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, max_position_embeddings=1024,
        )
        AutoModelForCausalLM.from_config(config).save_pretrained(directory)
        AutoTokenizer.from_pretrained(convert_default_model()).save_pretrained(directory)
    return directory


def _small_run(project: Path) -> dict[str, Path]:
    import yaml

    from lit_rlhf.cli import main

    root = project / "runs" / "notebook_small"
    tiny = _tiny_model(root / "tiny-init")
    configs = project / "configs" / "quickstart"
    common = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    stages = {
        "sft": ["--model.model", str(tiny), "--model.lr", "1e-3", "--data.train_samples", "64", "--data.val_samples", "8",
                "--model.rouge_batches", "1"],
        "rm": ["--model.model", str(root / "sft" / "model"), "--model.lr", "1e-3", "--data.train_samples", "64",
               "--data.normalization_samples", "8", "--trainer.max_epochs", "1"],
        "ppo": ["--model.policy", str(root / "sft" / "model"), "--model.reward_model", str(root / "rm" / "model"),
                "--model.lr", "1e-3", "--data.total_episodes", "32", "--data.batch_size", "8", "--data.val_samples", "16"],
    }
    for stage, args in stages.items():
        if not (root / stage / "model" / "config.json").is_file():
            config = yaml.safe_load((configs / f"{stage}.yaml").read_text())
            for callback in config["trainer"]["callbacks"]:  # PPO exports its policy every 2 of 4 updates as well
                if stage == "ppo" and callback["class_path"].endswith("HFExport"):
                    callback["init_args"] = {"every_n_updates": 2}
            path = root / f"{stage}.yaml"
            path.write_text(yaml.safe_dump(config))
            here = Path.cwd()
            os.chdir(project)  # the configs' data paths are relative to the project root
            try:
                main([stage, "fit", "--config", str(path), "--trainer.default_root_dir", str(root / stage), *common, *args])
            finally:
                os.chdir(here)
    return {"root": root, "sft": root / "sft" / "model", "rm": root / "rm" / "model", "ppo": root / "ppo" / "model",
            "ppo_updates": root / "ppo" / "updates", "small": True}


def runs(project: Path) -> dict[str, Path]:
    """Paths of the exports to evaluate: ``sft``, ``rm``, ``ppo`` (and ``dpo``, ``online_dpo``, ``ppo_updates`` when
    they exist), ``root``, and ``small`` (True for the small run)."""
    quickstart = project / "runs" / "quickstart"
    wanted = {name: quickstart / name / "model" for name in ("sft", "rm", "ppo")}
    if os.environ.get("LIT_RLHF_NOTEBOOK_RUN") != "small" and all((path / "config.json").is_file() for path in wanted.values()):
        found = {"root": quickstart, **wanted, "small": False}
        for name in ("dpo", "online_dpo"):
            if (quickstart / name / "model" / "config.json").is_file():
                found[name] = quickstart / name / "model"
        if (quickstart / "ppo" / "updates").is_dir():
            found["ppo_updates"] = quickstart / "ppo" / "updates"
        return found
    return _small_run(project)
