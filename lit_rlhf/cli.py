"""``lit-rlhf STAGE {fit,validate,test} --config FILE``: one LightningCLI per stage.

Every knob is a typed ``__init__`` argument of the stage's LightningModule or DataModule, so
``lit-rlhf sft fit --print_config`` documents them all. The data's tokenizer is linked to the stage's model.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Optional

from lightning.pytorch.cli import LightningCLI

from lit_rlhf.data.datamodules import PreferenceDataModule, PromptDataModule, SFTDataModule
from lit_rlhf.stages.dpo import DPOModule
from lit_rlhf.stages.online_dpo import OnlineDPOModule
from lit_rlhf.stages.ppo import PPOModule
from lit_rlhf.stages.reward import RewardModule
from lit_rlhf.stages.sft import SFTModule

#: stage name -> (LightningModule, LightningDataModule, the module argument that names the tokenizer's model)
STAGES = {
    "sft": (SFTModule, SFTDataModule, "model.model"),
    "rm": (RewardModule, PreferenceDataModule, "model.model"),
    "ppo": (PPOModule, PromptDataModule, "model.policy"),
    "dpo": (DPOModule, PreferenceDataModule, "model.model"),
    "online-dpo": (OnlineDPOModule, PromptDataModule, "model.policy"),
}


def _stage_cli(tokenizer_source: str) -> type[LightningCLI]:
    class StageCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001
            parser.link_arguments(tokenizer_source, "data.tokenizer")

    return StageCLI


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the ``lit-rlhf`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in STAGES:
        names = "|".join(STAGES)
        print(f"usage: lit-rlhf {{{names}}} {{fit,validate,test}} --config FILE [options]", file=sys.stderr)
        raise SystemExit(2)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    module, datamodule, tokenizer_source = STAGES[argv[0]]
    # sys.argv stays whole: Lightning's DDP launcher re-runs `sys.argv` for the other ranks, stage included.
    # The arguments go in explicitly, so LightningCLI's warning about args *and* sys.argv does not apply.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        _stage_cli(tokenizer_source)(
            module,
            datamodule,
            args=argv[1:],
            parser_kwargs={"prog": f"lit-rlhf {argv[0]}"},
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
        )


if __name__ == "__main__":
    main()
