"""Config values checked before anything slow starts: one row per value users get wrong.

Without these, `optimizer.lr=-1e-3` fails inside torch after the model loaded, and `adapter.r=0`
inside PEFT, each with a traceback. A row names the key, what a valid value is, and one that works;
keys the composed config lacks (adapter.r under adapter=full) are skipped.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from omegaconf import MISSING, DictConfig, OmegaConf

from tunelab.errors import TunelabError

UNLIMITED = -1  # Lightning's "no limit" for max_steps / max_epochs


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive(value) -> bool:
    return is_number(value) and value > 0


def non_negative(value) -> bool:
    return is_number(value) and value >= 0


def at_least(minimum: int) -> Callable[[object], bool]:
    return lambda value: is_integer(value) and value >= minimum


def fraction(value) -> bool:
    """In [0, 1): a dropout probability (1 would drop everything)."""
    return is_number(value) and 0 <= value < 1


def unit_interval(value) -> bool:
    return is_number(value) and 0 <= value <= 1


def limit(value) -> bool:
    """-1 (no limit) or a count of at least one: 0 would train nothing and still write a finished run."""
    return is_integer(value) and (value == UNLIMITED or value >= 1)


def known_encoding(value) -> bool:
    try:
        codecs.lookup(str(value))
    except LookupError:
        return False
    return True


@dataclass(frozen=True)
class Check:
    key: str                       # dotted config path
    valid: Callable[[object], bool]
    rule: str                      # what a valid value is, as the message says it
    example: str                   # a value that works, shown as the fix
    nullable: bool = False         # null means "off" / "default" for this key


CHECKS = (
    Check("optimizer.lr", positive, "> 0", "2e-4"),
    Check("optimizer.weight_decay", non_negative, ">= 0", "0.01"),
    Check("optimizer.eps", positive, "> 0", "1e-8"),
    Check("adapter.r", at_least(1), "an integer >= 1 (the LoRA rank)", "8"),
    Check("adapter.lora_alpha", positive, "> 0", "16"),
    Check("adapter.lora_dropout", fraction, "in [0, 1)", "0.05"),
    Check("data.batch_size", at_least(1), "an integer >= 1", "8"),
    Check("data.eval_batch_size", at_least(1), "an integer >= 1", "16"),
    # One token has nothing before it to predict it from: a training sequence needs two.
    Check("data.max_length", at_least(2), "an integer >= 2 (tokens per sequence)", "256"),
    Check("data.max_train_examples", at_least(1), "an integer >= 1, or null for all", "1000", nullable=True),
    Check("data.val_size", non_negative, ">= 0 (a fraction below 1, or a count)", "0.1"),
    Check("data.test_size", non_negative, ">= 0 (a fraction below 1, or a count)", "0.1"),
    Check("data.encoding", known_encoding, "an encoding Python knows", "latin-1"),
    Check("trainer.accumulate_grad_batches", at_least(1), "an integer >= 1", "4"),
    Check("trainer.max_steps", limit, "-1 (no limit) or an integer >= 1 (0 trains nothing)", "100"),
    Check("trainer.max_epochs", limit, "-1 (no limit) or an integer >= 1 (0 trains nothing)", "1", nullable=True),
    Check("trainer.gradient_clip_val", non_negative, ">= 0, or null for no clipping", "1.0", nullable=True),
    Check("scheduler.warmup_ratio", unit_interval, "in [0, 1]", "0.05", nullable=True),
    Check("scheduler.warmup_steps", at_least(0), "an integer >= 0, or null to use warmup_ratio", "10", nullable=True),
)
BY_KEY = {check.key: check for check in CHECKS}
ABSENT = object()


def check_value(key: str, value) -> None:
    """Raise the one-line error for `key=value` if a row covers the key and the value breaks it."""
    check = BY_KEY.get(key)
    if check is None or (value is None and check.nullable) or check.valid(value):
        return
    raise TunelabError(f"{key}={value} is not valid: it must be {check.rule}; e.g. {key}={check.example}")


def missing_values(values, prefix: str = "") -> list[str]:
    """Keys whose value is `???` (model=hf's name_or_path, model=run's run_dir): the user must give them."""
    if isinstance(values, dict):
        items = values.items()
    elif isinstance(values, list):
        items = enumerate(values)
    else:
        return []
    found = []
    for key, value in items:
        found += [f"{prefix}{key}"] if value == MISSING else missing_values(value, f"{prefix}{key}.")
    return found


def check_required(cfg: DictConfig) -> None:
    # Unresolved: interpolations may need Hydra's runtime, which does not exist before Hydra runs.
    values = OmegaConf.to_container(cfg, resolve=False)
    values.pop("hydra", None)  # Hydra's own config has `???` values that Hydra fills in itself
    missing = missing_values(values)
    if missing:
        raise TunelabError(f"{', '.join(missing)} has no value and needs one: add "
                           f"{' '.join(f'{key}=VALUE' for key in missing)} to the command line")


def check_config(cfg: DictConfig) -> None:
    """Every required value given, and every row whose key the composed config has."""
    check_required(cfg)
    for check in CHECKS:
        value = OmegaConf.select(cfg, check.key, default=ABSENT)
        if value is not ABSENT:
            check_value(check.key, value)


def check_overrides(values: Iterable[tuple[str, object]]) -> None:
    """Every value of a sweep (`optimizer.lr=1e-3,-1e-3`), not only the first job's."""
    for key, value in values:
        check_value(key.lstrip("+~"), value)
