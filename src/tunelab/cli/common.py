"""What every entry point shares: quiet libraries, a config pre-flight, one-line errors."""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

from tunelab.errors import TunelabError
from tunelab.paths import CONF_DIR

PASS_THROUGH_FLAGS = ("--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc", "--version")


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*The number of training batches.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("transformers", "datasets", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)


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
    text = str(err)
    arg = re.search(r"unexpected keyword argument '(\w+)'", text)
    key = re.search(r"full_key: (\S+)", text)
    if not (arg and key):
        return None
    option = f"{key.group(1)}.{arg.group(1)}"
    return TunelabError(f"{option} is not an option of the chosen {key.group(1).split('.')[0]} config; "
                        f"remove it with '~{option}' (an experiment or an earlier override set it)")


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


def preflight(argv: list[str], config_name: str) -> None:
    """Compose the config once before Hydra runs and check its values, so a bad override is one line and
    exit 2 within seconds, before Hydra creates a run dir or anything slow starts."""
    if any(flag in argv for flag in PASS_THROUGH_FLAGS):
        return
    from tunelab import checks

    overrides = command_overrides(argv)
    try:
        checks.check_overrides(swept_values(overrides))
        cfg = compose_config(config_name, first_of_sweeps(overrides))
        checks.check_config(cfg)
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
