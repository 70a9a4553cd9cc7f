"""lit_rlhf's DeepSpeed helpers on raw ZeRO-2/3 engines, 2 CPU processes under torchrun.

Lightning's ``DeepSpeedStrategy`` refuses a CPU accelerator (the full stages under DeepSpeed are GPU checks,
``tests/test_gpu.py``), but DeepSpeed itself runs on CPU: these tests check what lit_rlhf adds on top of it, i.e.
ZeRO-3 generation gathered once with the engine's hooks lifted and restored, the ZeRO-3 full state dict of the
export, and manual gradient accumulation through ``accumulation_boundary``. Skipped without the ``deepspeed`` extra.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT
from stage_helpers import free_port

pytest.importorskip("deepspeed")

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_helpers_match_plain_pytorch(tiny_model_dir, stage):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(ROOT / "tests" / "deepspeed_worker.py"), str(tiny_model_dir), str(stage),
    ]
    process = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    output = process.stdout + process.stderr
    assert process.returncode == 0, output[-6000:]
    for rank in (0, 1):
        assert f"DEEPSPEED-CHECKS-PASSED stage={stage} rank={rank}" in output
