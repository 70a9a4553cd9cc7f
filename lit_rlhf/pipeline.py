"""Run SFT -> RM -> REINFORCE++ (or PPO, RLOO, GRPO; and DPO, online DPO) from one config directory and print the summary.

A config directory with a ``pipeline.yaml`` lists its own steps (``steps``: ``name``, ``stage`` (a ``lit-rlhf``
subcommand, ``eval`` included), ``command`` (``fit``/``validate``; none for ``eval``) and ``config``) and its
``summary`` (``"chat"``: :func:`lit_rlhf.evaluation.report.chat_summary`); ``configs/quickstart_chat`` is one (``make
quickstart-chat``: SFT, a reward model on a mixture of chat preference sets, online iterative DPO, ``eval`` on MT-Bench).
Without one, the TL;DR quickstart's steps below run.

``python -m lit_rlhf.pipeline configs/quickstart`` (the quickstart's main job) runs, each through the
``lit-rlhf`` CLI:

1. ``sft validate`` (the base model: loss and ROUGE before training), 2. ``sft fit``, 3. ``rm fit``,
4. ``reinforce-pp validate`` (the SFT policy), 5. ``reinforce-pp fit`` (REINFORCE++, ends with validation of its policy;
   ``--policy_gradient ppo`` runs PPO instead, or ``rloo``, ``grpo``, ``dr_grpo``),

timing each, then prints :func:`lit_rlhf.evaluation.report.summary`. It first prints the precision it picked and why,
and roughly how long the run takes on such a host (:func:`precision_message`). The run directory is read from the SFT
config's ``trainer.default_root_dir`` parent (``runs/quickstart``) and emptied first.

``--dpo`` runs, on top of a finished main job (its SFT and RM exports), 1. ``dpo fit`` (offline DPO, ends with
the implicit-reward accuracy on the validation comparisons), 2. ``ppo validate`` of the DPO policy against the
SFT policy (the same prompts and seeds as every other policy), 3. ``online-dpo fit`` (ends with its validation),
then prints the summary with all four policies in one table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

from lit_rlhf.evaluation.report import chat_summary, summary

#: the CPU flags (``/proc/cpuinfo``) of native bf16 matrix products
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def native_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> Optional[list[str]]:
    """The :data:`BF16_FLAGS` the CPU has (``/proc/cpuinfo``), ``None`` where that file cannot be read (not Linux)."""
    try:
        flags = set(Path(cpuinfo).read_text().split())
    except OSError:
        return None
    return [flag for flag in BF16_FLAGS if flag in flags]


def cpu_precision() -> str:
    """``"bf16-mixed"`` where the CPU has native bf16 (AVX512_BF16 or AMX, :func:`native_bf16_flags`), else ``"32-true"``.

    Without native support PyTorch emulates bf16 matrix products: measured here 45 GFLOP/s in bf16 against
    201 GFLOP/s in fp32 on an AVX-512 Xeon without AVX512_BF16, so fp32 is the fast choice there.
    """
    return "bf16-mixed" if native_bf16_flags() else "32-true"


#: (pipeline, precision) -> (minutes a run took or should take on a 2-core CPU, how the figure was obtained); pipelines
#: (:func:`pipeline_name`): ``quickstart`` (``make quickstart``), ``PPO quickstart`` (``--policy_gradient ppo``),
#: ``quickstart's DPO steps`` (``make quickstart-dpo`` after the main job), ``chat quickstart`` (``make quickstart-chat``).
#: Sources: docs/benchmarks/quickstart.md, docs/benchmarks/dpo-ppo-max.md, docs/chat.md.
RUN_MINUTES = {
    ("quickstart", "bf16-mixed"): (12.6, "measured: 12 min 33 s, `time make quickstart` from a fresh clone, 2026-12-07"),
    ("quickstart", "32-true"): (32.0, "estimated: the PPO quickstart took 67 min 21 s in fp32 (issue 28), and this one "
                                      "takes 48% of PPO's time in bf16 (12 min 33 s against 26 min 16 s)"),
    ("PPO quickstart", "bf16-mixed"): (26.3, "measured: 26 min 16 s, `time make quickstart` with PPO, 2026-12-06"),
    ("PPO quickstart", "32-true"): (67.4, "measured: 67 min 21 s, a user's `time make quickstart` with PPO (issue 28)"),
    ("quickstart's DPO steps", "bf16-mixed"): (8.0, "measured: its steps 138 + 91 + 238 s"),
    ("chat quickstart", "bf16-mixed"): (30.2, "measured: 30 min 13 s, `time make quickstart-chat` from a fresh clone"),
}


def pipeline_name(args: argparse.Namespace) -> str:
    """The :data:`RUN_MINUTES` name of the run ``args`` asks for (``--only`` a part, another config directory or
    policy gradient: a name with no figure)."""
    if args.only:
        return "partial run"
    if args.config_dir.name == "quickstart_chat":
        return "chat quickstart"
    if args.config_dir.name != "quickstart":
        return str(args.config_dir)
    if args.dpo:
        return "quickstart's DPO steps"
    return {POLICY_GRADIENT: "quickstart", "ppo": "PPO quickstart"}.get(args.policy_gradient, f"{args.policy_gradient} quickstart")


def host_cores() -> int:
    """CPU cores this process may run on (``sched_getaffinity``; ``os.cpu_count`` where that is missing)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def precision_message(precision: str, requested: str, pipeline: str) -> str:
    """What the pipeline prints at its start: the precision and why; on a second line roughly how long the run takes
    on a host like this one (:data:`RUN_MINUTES`, measured or estimated on 2 cores; nothing where no figure is recorded). The figure
    is not scaled by this host's core count: the steps do not speed up in proportion to cores.

    Args:
        precision: the Lightning precision the steps run in.
        requested: ``--precision`` (``"auto"``: chosen by :func:`cpu_precision`).
        pipeline: a :data:`RUN_MINUTES` pipeline name, or another (no estimate).
    """
    if requested != "auto":
        why = "--precision"
    else:
        flags = native_bf16_flags()
        if flags is None:
            why = "/proc/cpuinfo unreadable, so native bf16 is unknown"
        elif flags:
            why = f"this CPU has native bf16: {', '.join(flags)}"
        else:
            why = (f"this CPU has no native bf16 ({' or '.join(BF16_FLAGS)}); PyTorch would emulate bf16, about 4x "
                   "slower than fp32")
    message = f"precision: {precision} ({why})"
    if (pipeline, precision) in RUN_MINUTES:
        minutes, source = RUN_MINUTES[(pipeline, precision)]
        message += (f"\ntime: the {pipeline} takes about {minutes:.0f} min on 2 such cores, a rough estimate ({source}); "
                    f"this host has {host_cores()} cores")
    return message


#: the quickstart's policy-gradient stage (``--policy_gradient``; ``configs/quickstart/{name}.yaml``): REINFORCE++, the
#: one that gained most over SFT on held-out training prompts at the quickstart's budget (docs/stages/policy-gradients.md)
POLICY_GRADIENT = "reinforce_pp"
POLICY_GRADIENTS = ("ppo", "rloo", "grpo", "dr_grpo", "reinforce_pp")


def main_steps(policy_gradient: str = POLICY_GRADIENT) -> list[tuple[str, str, str, str]]:
    """The main job's steps, ``(step name, CLI stage, command, config file stem)``."""
    stage = policy_gradient.replace("_", "-")
    return [
        ("sft validate", "sft", "validate", "sft"), ("sft fit", "sft", "fit", "sft"), ("rm fit", "rm", "fit", "rm"),
        (f"{stage} validate", stage, "validate", policy_gradient), (f"{stage} fit", stage, "fit", policy_gradient),
    ]

DPO_STEPS = [
    ("dpo fit", "dpo", "fit", "dpo"), ("dpo eval", "ppo", "validate", "ppo"), ("online-dpo fit", "online-dpo", "fit", "online_dpo"),
]


def _root(config: Path) -> Path:
    return Path(yaml.safe_load(config.read_text())["trainer"]["default_root_dir"])


def _extra_args(step: str, configs: dict[str, Path], run_dir: Path) -> list[str]:
    """The DPO policy is validated by the PPO stage's validation against the SFT policy, into its own directory."""
    if step != "dpo eval":
        return []
    return [
        "--model.policy", str(_root(configs["dpo"]) / "model"), "--model.ref_policy", str(_root(configs["sft"]) / "model"),
        "--trainer.default_root_dir", str(run_dir / "dpo_eval"), "--trainer.logger.init_args.name", "dpo_eval",
    ]


def _steps_of(config_dir: Path) -> tuple[list[tuple[str, str, str, str]], str]:
    """The steps (``(name, stage, command, config stem)``) and summary kind of a directory's ``pipeline.yaml``.

    Raises:
        SystemExit: naming the file and the step, for a step without a name, stage or config.
    """
    spec = yaml.safe_load((config_dir / "pipeline.yaml").read_text())
    steps = []
    for index, step in enumerate(spec.get("steps") or []):
        missing = [key for key in ("name", "stage", "config") if not step.get(key)]
        if missing:
            raise SystemExit(f"{config_dir / 'pipeline.yaml'}: step {index + 1} lacks {missing}")
        steps.append((step["name"], step["stage"], step.get("command", ""), Path(step["config"]).stem))
    return steps, spec.get("summary", "tldr")


def main(argv: list[str] | None = None) -> None:
    """``python -m lit_rlhf.pipeline CONFIG_DIR [--precision P] [--keep] ...``: say the precision and rough duration,
    run each step of the recipe as a ``lit-rlhf`` subprocess, time it, and print the run's summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config_dir", type=Path, help="directory with sft.yaml, rm.yaml, ppo.yaml (and dpo.yaml, online_dpo.yaml)")
    parser.add_argument("--precision", default="auto", help="Lightning precision, or 'auto' (CPU: see cpu_precision)")
    parser.add_argument("--keep", action="store_true", help="do not empty the run directory first")
    parser.add_argument("--dpo", action="store_true", help="run offline and online DPO on a finished main job's outputs")
    parser.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps (e.g. 'online-dpo fit'), keeping the rest")
    parser.add_argument("--policy_gradient", choices=POLICY_GRADIENTS, default=POLICY_GRADIENT,
                        help=f"the main job's policy-gradient stage (default {POLICY_GRADIENT}); its config is CONFIG_DIR/NAME.yaml")
    args = parser.parse_args(argv)
    if (args.config_dir / "pipeline.yaml").is_file():
        return _run_listed(args)
    main_job = main_steps(args.policy_gradient)
    steps = _selected(DPO_STEPS if args.dpo else main_job, args)
    configs = {stem: args.config_dir / f"{stem}.yaml" for _, _, _, stem in main_job + steps}
    for path in configs.values():
        if not path.is_file():
            raise SystemExit(f"missing config {path}")
    run_dir = _root(configs["sft"]).parent
    if args.dpo:
        for needed in (_root(configs["sft"]) / "model", _root(configs["rm"]) / "model"):
            if not (needed / "config.json").is_file():
                raise SystemExit(f"--dpo needs the main job's export {needed}: run `make quickstart` first")
    elif run_dir.exists() and not args.keep:
        print(f"emptying {run_dir}", flush=True)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    precision = cpu_precision() if args.precision == "auto" else args.precision
    print(precision_message(precision, args.precision, pipeline_name(args)), flush=True)
    timings_path = run_dir / "timings.json"
    keep_timings = (args.dpo or args.only) and timings_path.is_file()
    timings: dict[str, float] = json.loads(timings_path.read_text())["stages"] if keep_timings else {}
    commands = {
        name: [stage, command, "--config", str(configs[stem]), "--trainer.precision", precision, *_extra_args(name, configs, run_dir)]
        for name, stage, command, stem in steps
    }
    _run_commands(commands, timings, timings_path, precision)
    print(summary(run_dir, policy_gradient=None if args.dpo else args.policy_gradient))


def _selected(steps: list[tuple[str, str, str, str]], args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    """The steps ``--only`` names (which then implies ``--keep``), all of them without it."""
    if not args.only:
        return steps
    unknown = set(args.only) - {name for name, *_ in steps}
    if unknown:
        raise SystemExit(f"unknown step(s) {sorted(unknown)}; steps: {[name for name, *_ in steps]}")
    args.keep = True
    return [step for step in steps if step[0] in args.only]


def _run_commands(commands: dict[str, list[str]], timings: dict[str, float], timings_path: Path, precision: str) -> None:
    """Run each step's ``lit-rlhf`` command line in a fresh process, its wall time written to ``timings_path`` after
    each; a failing step stops the pipeline with its exit code."""
    for name, cli in commands.items():
        print(f"\n>>> lit-rlhf {' '.join(cli)}", flush=True)
        start = time.time()
        result = subprocess.run([sys.executable, "-m", "lit_rlhf.cli", *cli])
        timings[name] = time.time() - start
        timings_path.write_text(json.dumps({"precision": precision, "stages": timings}, indent=1))
        if result.returncode != 0:
            raise SystemExit(f"step '{name}' failed with exit code {result.returncode}")


def _run_listed(args: argparse.Namespace) -> None:
    """The steps of the config directory's ``pipeline.yaml``, then its summary."""
    steps, kind = _steps_of(args.config_dir)
    configs = {stem: args.config_dir / f"{stem}.yaml" for _, _, _, stem in steps}
    for path in configs.values():
        if not path.is_file():
            raise SystemExit(f"missing config {path}")
    trained = [stem for _, stage, _, stem in steps if stage != "eval"]
    run_dir = _root(configs[trained[0]]).parent
    steps = _selected(steps, args)
    if run_dir.exists() and not args.keep:
        print(f"emptying {run_dir}", flush=True)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    precision = cpu_precision() if args.precision == "auto" else args.precision
    print(precision_message(precision, args.precision, pipeline_name(args)), flush=True)
    timings_path = run_dir / "timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text())["stages"] if args.only and timings_path.is_file() else {}
    commands = {
        name: ["eval", "--config", str(configs[stem]), "--precision", precision] if stage == "eval"
        else [stage, command, "--config", str(configs[stem]), "--trainer.precision", precision]
        for name, stage, command, stem in steps
    }
    _run_commands(commands, timings, timings_path, precision)
    print(chat_summary(run_dir) if kind == "chat" else summary(run_dir))


if __name__ == "__main__":
    main()
