"""Progress lines where the output is not a terminal (lit_rlhf.callbacks.ProgressLines), as every stage gets them."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace

import pytest
import yaml
from lightning.pytorch.trainer.states import TrainerFn
from stage_helpers import stage_config

from lit_rlhf.callbacks import ProgressLines, progress_line
from lit_rlhf.cli import main


def test_progress_line_rate_and_time_left():
    # 120 of 308 steps in 636 s: 5.3 s a step, 188 steps left -> 996.4 s
    assert progress_line("rm fit", "step", 120, 308, 636.0) == "[rm fit] step 120/308 (39%) | 5.3 s/step | elapsed 10:36 | left ~16:36"
    # fast steps read as a rate; hours shown past the hour
    assert progress_line("sft fit", "step", 50, 100, 10.0) == "[sft fit] step 50/100 (50%) | 5.00 step/s | elapsed 0:10 | left ~0:10"
    assert progress_line("ppo fit", "update", 2, 100, 3725.0) == (
        "[ppo fit] update 2/100 (2%) | 1862.5 s/update | elapsed 1:02:05 | left ~50:42:05"
    )
    # a resumed run: 10 of 16 updates done, 4 of them in this process's 60 s -> 15 s each, 6 left -> 1:30
    assert progress_line("ppo fit", "update", 10, 16, 60.0, counted=4) == (
        "[ppo fit] update 10/16 (62%) | 15.0 s/update | elapsed 1:00 | left ~1:30"
    )
    # no total: no percentage, no time left; nothing counted yet: no rate
    assert progress_line("x fit", "step", 7, None, 14.0) == "[x fit] step 7 | 2.0 s/step | elapsed 0:14"
    assert progress_line("x fit", "step", 3, 10, 5.0, counted=0) == "[x fit] step 3/10 (30%) | - | elapsed 0:05"


def _validating_trainer() -> SimpleNamespace:
    return SimpleNamespace(is_global_zero=True, sanity_checking=False, num_val_batches=[3],
                           state=SimpleNamespace(fn=TrainerFn.VALIDATING))


def _validate(callback: ProgressLines, stdout, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdout", stdout)
    trainer, module = _validating_trainer(), SimpleNamespace(stage_name="rm")
    callback.on_validation_start(trainer, module)
    for index in range(3):
        callback.on_validation_batch_end(trainer, module, None, None, index)


def _heads(text: str) -> list[str]:
    """``[stage command] unit i/N`` of each progress line in ``text``."""
    return re.findall(r"^(\[\S+ \w+\] [a-z ]+ \d+(?:/\d+)?)", text, re.MULTILINE)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_nothing_on_a_terminal_and_lines_at_the_interval_elsewhere(monkeypatch):
    terminal = _Terminal()
    _validate(ProgressLines(interval=0), terminal, monkeypatch)
    assert terminal.getvalue() == ""  # the bar's place
    log = io.StringIO()
    _validate(ProgressLines(interval=0), log, monkeypatch)
    assert _heads(log.getvalue()) == [
        f"[rm validate] validation batch {i}/3" for i in (1, 2, 3)
    ]
    quiet = io.StringIO()
    _validate(ProgressLines(interval=3600), quiet, monkeypatch)
    assert quiet.getvalue() == ""  # the first line an interval after the start
    with pytest.raises(ValueError, match="interval"):
        ProgressLines(interval=-1)




def test_every_stage_prints_progress_lines_with_the_run_totals(tiny_model_dir, tiny_reward_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ProgressLines.__init__, "__defaults__", (0.0,))  # the default one, at every batch
    model = {"policy": str(tiny_model_dir), "reward_model": str(tiny_reward_dir)}
    main(["ppo", "fit", "--config", str(stage_config("ppo", tmp_path, model=model))])  # 2 updates of 2 episodes
    heads = _heads(capsys.readouterr().out)
    assert heads == ["[ppo fit] update 1/2", "[ppo fit] update 2/2",
                     "[ppo fit] validation batch 1/2", "[ppo fit] validation batch 2/2"]


def test_a_listed_progress_callback_replaces_the_default(tiny_model_dir, tmp_path, capsys):
    config = stage_config("rm", tmp_path, model={"model": str(tiny_model_dir)})
    settings = yaml.safe_load(config.read_text())
    settings["trainer"]["callbacks"].append({"class_path": "lit_rlhf.callbacks.ProgressLines", "init_args": {"interval": 0}})
    config.write_text(yaml.safe_dump(settings))
    main(["rm", "fit", "--config", str(config)])  # 8 comparisons in batches of 2: 4 steps; 4 in batches of 2
    heads = _heads(capsys.readouterr().out)
    assert heads == [f"[rm fit] step {i}/4" for i in (1, 2, 3, 4)] + [f"[rm fit] validation batch {i}/2" for i in (1, 2)]
