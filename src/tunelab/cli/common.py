"""What every entry point shares: quiet libraries, a config pre-flight, one-line errors."""

from __future__ import annotations

import re
import sys

from tunelab.errors import TunelabError
from tunelab.run.quiet import quiet_libraries  # noqa: F401  (every entry point imports it from here)
from tunelab.paths import CONF_DIR

PASS_THROUGH_FLAGS = ("--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc", "--version")


def die(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def user_error(err: BaseException) -> TunelabError | None:
    """The TunelabError behind an exception, if any (hydra's instantiate wraps what targets raise)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, TunelabError):
            return err
        seen.add(id(err))
        unknown = unknown_option(err)
        if unknown:
            return unknown
        err = err.__cause__ or err.__context__
    return None


def unknown_option(err: BaseException) -> TunelabError | None:
    """A config key the `_target_` does not take, e.g. a key an experiment set for another group choice."""
    from tunelab.config.options import listed_options, no_such_option, target_parameters

    text = str(err)
    arg = re.search(r"unexpected keyword argument '(\w+)'", text)
    key = re.search(r"full_key: (\S+)", text)
    if not (arg and key):
        return None
    path, name = key.group(1), arg.group(1)
    target = re.search(r"Error in call to target '([\w.]+)'", text)
    parameters = target_parameters(target.group(1)) if target else None
    options = listed_options(parameters, None) if parameters else []
    message = no_such_option(path, name, options) if options else f"{path} has no option '{name}'"
    return TunelabError(f"{message}; remove it with '~{path}.{name}' (an experiment or an earlier override set it)")


def one_line(err: BaseException) -> str:
    """Hydra's multi-line composition errors folded into one readable line."""
    text = str(err).split("Config search path")[0]
    text = re.sub(r"\s+", " ", text.replace("Available options in", "; available options in")).strip()
    return text.replace(" ;", ";").removeprefix("In 'train': ")


def parsed_overrides(overrides: list[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(overrides)


def first_of_sweeps(overrides: list[str]) -> list[str]:
    """One concrete job of a multirun: the first value of every sweep (others only add combinations)."""
    concrete = []
    for override in parsed_overrides(overrides):
        if override.is_sweep_override():
            try:
                first = next(iter(override.sweep_string_iterator()))
            except Exception:  # range/interval searches: left to the sweeper
                continue
            concrete.append(f"{override.get_key_element()}={first}")
        else:
            concrete.append(override.input_line)
    return concrete


def swept_values(overrides: list[str]) -> list[tuple[str, object]]:
    """(key, value) for every value of every listed sweep, so a bad one is refused before job one runs."""
    values = []
    for override in parsed_overrides(overrides):
        if not override.is_sweep_override():
            continue
        try:
            values += [(override.key_or_group, value) for value in override.sweep_iterator()]
        except Exception:  # interval searches have no list of values: the sweeper samples them
            continue
    return values


def command_overrides(argv: list[str]) -> list[str]:
    """The key=value arguments, without Hydra's flags and the values those flags take."""
    skip_next = False
    overrides = []
    for arg in argv:
        if skip_next:
            skip_next = False
            continue
        if arg in ("--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun"):
            skip_next = True
            continue
        if not arg.startswith("-"):
            overrides.append(arg)
    return overrides


def named_run_dir(argv: list[str]) -> str | None:
    """The run dir a single run was given on the command line (`hydra.run.dir=`); a multirun's jobs lock their own."""
    if any(a in ("-m", "--multirun") for a in argv):
        return None
    chosen = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")]
    return chosen[-1] if chosen else None


def preflight(argv: list[str], config_name: str) -> None:
    """Compose the config once before Hydra runs and check its values, so a bad override is one line and
    exit 2 within seconds, before Hydra creates a run dir or anything slow starts."""
    if any(flag in argv for flag in PASS_THROUGH_FLAGS):
        return
    from tunelab.config import checks, requirements
    from tunelab.models import hub

    overrides = command_overrides(argv)
    try:
        checks.check_overrides(swept_values(overrides))
        concrete = first_of_sweeps(overrides)
        cfg = compose_checked(config_name, concrete)
        checks.check_config(cfg)
        check_machine(cfg)
        requirements.check_optional(cfg)  # mlflow, bitsandbytes, lm-eval, a launcher's plugin or SLURM: installed?
        hub.check_hub_names(cfg)  # before anything else may import datasets with its online settings
        check_harness_tasks(cfg)
        check_data_file(cfg)
        check_override_keys(cfg, concrete)
        requirements.check_targets(cfg)  # last: it imports every target's module (seconds); the checks above do not
    except TunelabError:
        raise
    except Exception as err:
        raise TunelabError(one_line(err)) from None


def compose_config(config_name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return compose(config_name, overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def compose_checked(config_name: str, overrides: list[str]):
    """The composed config, or Hydra's error in one line; for a key a `_target_` does not take, the
    target's real options instead of Hydra's advice to add it with `+` (which fails later)."""
    from tunelab.config.requirements import missing_plugin

    try:
        return compose_config(config_name, overrides)
    except Exception as err:
        raise (not_overridable(err, config_name, overrides) or missing_plugin(err)
               or TunelabError(one_line(err))) from None


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def not_overridable(err: Exception, config_name: str, overrides: list[str]) -> TunelabError | None:
    """For Hydra's "Could not override 'KEY'": the unknown-option error of KEY, judged on the config
    composed without it (None when KEY is a real option, where Hydra's `+` advice is right)."""
    from tunelab.config.options import unknown_key_error

    failed = re.search(r"Could not override '([^']+)'", str(err))
    if not failed:
        return None
    rest = [o for o in overrides if override_key(o) != failed.group(1)]
    try:
        cfg = compose_config(config_name, rest)
    except Exception:  # another override is broken too: Hydra's own message comes first
        return None
    return unknown_key_error(cfg, failed.group(1))


def check_machine(cfg) -> None:
    """A trainer this machine cannot run (trainer=gpu without CUDA, deepspeed not installed)."""
    from tunelab.platform.hardware import check_trainer

    if cfg.get("trainer") is not None:
        check_trainer(cfg.trainer)


def check_harness_tasks(cfg) -> None:
    """eval=lm_eval: an unknown task name, or a hub task whose data cannot be had offline, before the run dir."""
    from omegaconf import OmegaConf

    tasks = OmegaConf.select(cfg, "eval.harness.tasks", default=None)
    if tasks is None:
        return
    from tunelab.eval.harness import check_tasks

    check_tasks(list(tasks))


def check_data_file(cfg) -> None:
    """A local data file is read now, so a missing, undecodable or malformed one is refused before the
    model loads."""
    from tunelab.data.sources import check_local_file

    data = cfg.get("data")
    if data is None or "source" not in data:
        return
    if data.source is None:
        raise TunelabError("data.source is not set: data=custom reads your own file, give it with "
                           "data.source=PATH (.jsonl, .json, .csv, .parquet or .txt)")
    check_local_file(data.source, data.get("encoding") or "utf-8")


def check_override_keys(cfg, overrides: list[str]) -> None:
    """Keys set under a `_target_` node must be options of its target (hydra.* is Hydra's own business)."""
    from tunelab.config.options import unknown_key_error

    for override in overrides:
        key = override_key(override)
        if override.startswith("~") or key.startswith("hydra.") or "=" not in override:
            continue
        error = unknown_key_error(cfg, key)
        if error:
            raise error
