"""The pipeline's first lines: the precision it picked, why, and roughly how long the run takes (lit_rlhf.pipeline)."""

from __future__ import annotations

import pytest
from conftest import ROOT

from lit_rlhf import pipeline


def test_native_bf16_flags_reads_whole_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert pipeline.native_bf16_flags(cpuinfo) == ["avx512_bf16", "amx_bf16"]
    cpuinfo.write_text("flags\t\t: fpu sse2 avx512f avx512_vnni\n")
    assert pipeline.native_bf16_flags(cpuinfo) == []
    assert pipeline.native_bf16_flags(tmp_path / "missing") is None


def test_message_with_native_bf16(monkeypatch):
    monkeypatch.setattr(pipeline, "native_bf16_flags", lambda: ["avx512_bf16"])
    monkeypatch.setattr(pipeline, "host_cores", lambda: 4)
    assert pipeline.cpu_precision() == "bf16-mixed"
    first, time_line = pipeline.precision_message("bf16-mixed", "auto", "quickstart").splitlines()
    assert first == "precision: bf16-mixed (this CPU has native bf16: avx512_bf16)"
    assert time_line.startswith("time: the quickstart takes about 13 min on 2 such cores, a rough estimate (measured: 12 min 33 s")
    assert time_line.endswith("; this host has 4 cores")
    assert "about 30 min" in pipeline.precision_message("bf16-mixed", "auto", "chat quickstart")
    assert "about 8 min" in pipeline.precision_message("bf16-mixed", "auto", "quickstart's DPO steps")


def test_message_without_native_bf16(monkeypatch):
    monkeypatch.setattr(pipeline, "native_bf16_flags", lambda: [])
    assert pipeline.cpu_precision() == "32-true"
    first, time_line = pipeline.precision_message("32-true", "auto", "PPO quickstart").splitlines()
    assert first == ("precision: 32-true (this CPU has no native bf16 (avx512_bf16 or amx_bf16); PyTorch would emulate "
                     "bf16, about 4x slower than fp32)")
    assert time_line.startswith("time: the PPO quickstart takes about 67 min on 2 such cores, a rough estimate (measured: 67 min 21 s")
    assert "takes about 32 min" in pipeline.precision_message("32-true", "auto", "quickstart")  # estimated from PPO's
    # no fp32 figure recorded: no estimate; another pipeline, a part of one: none either
    for name in ("chat quickstart", "partial run", "configs/tldr/pythia-1b"):
        assert "\n" not in pipeline.precision_message("32-true", "auto", name)
    monkeypatch.setattr(pipeline, "native_bf16_flags", lambda: None)
    assert pipeline.precision_message("32-true", "auto", "x") == "precision: 32-true (/proc/cpuinfo unreadable, so native bf16 is unknown)"
    assert pipeline.precision_message("bf16-mixed", "bf16-mixed", "x") == "precision: bf16-mixed (--precision)"


@pytest.mark.parametrize(("args", "time_line"), [
    (["configs/quickstart"], "time: the quickstart takes about 32 min"),
    (["configs/quickstart", "--policy_gradient", "ppo"], "time: the PPO quickstart takes about 67 min"),
    (["configs/quickstart", "--policy_gradient", "rloo"], None),
    (["configs/quickstart_chat", "--precision", "bf16-mixed"], "time: the chat quickstart takes about 30 min"),
])
def test_the_pipeline_prints_it_first(args, time_line, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the configs' run directories (runs/...) are relative
    monkeypatch.setattr(pipeline, "native_bf16_flags", lambda: [])
    ran = []
    monkeypatch.setattr(pipeline, "_run_commands", lambda commands, *rest: ran.append(commands))
    monkeypatch.setattr(pipeline, "summary", lambda *args, **kwargs: "")
    monkeypatch.setattr(pipeline, "chat_summary", lambda *args, **kwargs: "")
    pipeline.main([str(ROOT / args[0]), *args[1:]])
    lines = capsys.readouterr().out.splitlines()
    assert ran and lines[0].startswith("precision: ")
    assert lines[1].startswith(time_line) if time_line else not lines[1].startswith("time:")
