"""Re-entering a run dir, decided before Hydra writes anything into it.

`tunelab-train hydra.run.dir=RUN ckpt_path=auto` resumes RUN with the overrides it was started with
(from RUN/.hydra/overrides.yaml), so the resumed run is the same run; an override that would change
what the checkpoint holds (model, data, method, optimizer, seed, ...) is refused in one line that
names it. Hydra is told not to rewrite RUN/.hydra, so the record of how the run started stays.
Without ckpt_path, a dir that holds a finished or an interrupted run is refused before Hydra starts,
so a refusal leaves every file of the run as it was.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

from tunelab.errors import TunelabError
from tunelab.run import rundir

# Overrides that change nothing a checkpoint holds: where results go and how they are shown.
HARMLESS = ("ckpt_path", "hydra", "logger", "eval", "trainer.enable_progress_bar", "trainer.log_every_n_steps",
            "tags", "merge", "merge_tolerance", "reproduce_rtol", "overwrite", "ledger")
RECORDED = Path(".hydra") / "overrides.yaml"


def key_of(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def value_of(argv: list[str], key: str) -> str | None:
    found = [a.split("=", 1)[1] for a in argv if "=" in a and key_of(a) == key]
    return found[-1] if found else None


def is_harmless(override: str) -> bool:
    key = key_of(override)
    return any(key == h or key.startswith(h + ".") for h in HARMLESS)


def recorded_overrides(run_dir: Path) -> list[str]:
    path = run_dir / RECORDED
    if not path.is_file():
        raise TunelabError(f"{run_dir} has no {RECORDED}, so how it was started is unknown; resume only "
                           "dirs written by tunelab-train, or start a new run")
    return [str(o) for o in OmegaConf.load(path)]


def changed_overrides(recorded: list[str], given: list[str]) -> list[str]:
    """The given overrides that would make the resumed run differ from the recorded one."""
    before = {key_of(o): o for o in recorded}
    changed = []
    for override in given:
        if is_harmless(override) or override in recorded:
            continue
        was = before.get(key_of(override))
        changed.append(f"{override} (was {was.split('=', 1)[1] if was else 'not set'})")
    return changed


def resume_argv(run_dir: Path, overrides: list[str]) -> list[str]:
    """The overrides of a resume: the recorded ones, the harmless extras, and no rewrite of .hydra/."""
    if rundir.is_finished(run_dir):
        raise TunelabError(f"{run_dir} holds a finished run (metrics.json): there is nothing to resume; "
                           "evaluate it with tunelab-evaluate, or start a new run in another hydra.run.dir")
    recorded = [o for o in recorded_overrides(run_dir) if key_of(o) not in ("ckpt_path", "overwrite")]
    changed = changed_overrides(recorded, overrides)
    if changed:
        raise TunelabError(f"resuming {run_dir} with overrides that change what it trains: {'; '.join(changed)}; "
                           f"resume with only `tunelab-train hydra.run.dir={run_dir} ckpt_path=auto`, "
                           "or start a new run in another hydra.run.dir")
    extras = [o for o in overrides if is_harmless(o) and key_of(o) != "ckpt_path" and o not in recorded]
    return [*recorded, *extras, f"hydra.run.dir={run_dir}", f"ckpt_path={value_of(overrides, 'ckpt_path')}",
            "hydra.output_subdir=null"]


def refuse_occupied(run_dir: Path) -> None:
    if rundir.is_finished(run_dir):
        raise TunelabError(f"{run_dir} already holds a finished run (metrics.json); pass overwrite=true to "
                           "replace it or choose another hydra.run.dir")
    if rundir.latest_checkpoint(run_dir) is not None:
        raise TunelabError(f"{run_dir} holds an interrupted run; resume it with `tunelab-train hydra.run.dir={run_dir} "
                           "ckpt_path=auto`, or pass overwrite=true to start it over")


def take_run_dir_args(argv: list[str]) -> None:
    """Rewrite argv (in place) for a resume, or refuse to enter an occupied run dir; before Hydra runs."""
    if os.environ.get("LOCAL_RANK", "0") != "0" or any(a in ("-m", "--multirun") for a in argv):
        return  # DDP children re-run rank 0's (already rewritten) command; sweeps keep their own dirs
    overrides = [a for a in argv[1:] if not a.startswith("-") and "=" in a]
    chosen = value_of(overrides, "hydra.run.dir")
    if chosen is None or not Path(chosen).is_dir():
        return
    run_dir = Path(chosen)
    if value_of(overrides, "overwrite") in ("true", "True", "1"):
        return
    if value_of(overrides, "ckpt_path") in (None, "null", "None"):
        if (run_dir / RECORDED).is_file():
            refuse_occupied(run_dir)
        return
    flags = [a for a in argv[1:] if a.startswith("-") or "=" not in a]
    argv[1:] = [*flags, *resume_argv(run_dir, overrides)]
