"""Hydra's override grammar as an Optuna search space: `choice(4, 8)`, `range(1, 9, 2)`, `interval(1e-5, 1e-2)`,
`tag(log, interval(...))`, from `hydra.sweeper.params` and the command line; any other override is fixed.

As hydra-optuna-sweeper read it, with two departures: Optuna 3+ distributions (Float/Int), and `range(a, b, s)`
keeps Hydra's meaning (b excluded: `range(1, 4)` is 1, 2, 3; the plugin's IntUniformDistribution also drew 4).
"""

from __future__ import annotations

from typing import Any

from tunelab.errors import TunelabError


def distribution_of(override) -> Any:
    """An Optuna distribution for a sweep override; the override's value string for a fixed one."""
    from hydra.core.override_parser.types import Transformer
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    key = override.get_key_element()
    if override.is_choice_sweep() or (override.is_range_sweep() and override.value().shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():
        values = list(override.sweep_iterator())
        if not values:
            raise TunelabError(f"{key}: {override.input_line} is an empty range; give range(start, stop, step) with start < stop")
        step = override.value().step
        if all(isinstance(v, int) for v in values) and isinstance(step, int):
            return IntDistribution(values[0], values[-1], step=step)
        return FloatDistribution(float(values[0]), float(values[-1]), step=float(step))
    if override.is_interval_sweep():
        interval = override.value()
        log = "log" in interval.tags
        if isinstance(interval.start, int) and isinstance(interval.end, int):
            return IntDistribution(interval.start, interval.end, log=log)
        return FloatDistribution(float(interval.start), float(interval.end), log=log)
    raise TunelabError(f"{key}: {override.input_line} is not a search space Optuna takes; use choice(...), "
                       "range(...), interval(...) or tag(log, interval(...))")


def search_space(arguments: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """(distributions by key, fixed overrides by key) from `key=value` strings, later ones winning."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from optuna.distributions import BaseDistribution

    space, fixed = {}, {}
    for override in OverridesParser.create().parse_overrides(arguments):
        key, value = override.get_key_element(), distribution_of(override)
        space.pop(key, None), fixed.pop(key, None)
        (space if isinstance(value, BaseDistribution) else fixed)[key] = value
    return space, fixed


def grid_of(space: dict[str, Any]) -> dict[str, list]:
    """GridSampler's lists: every value of each choice and range; an interval has no grid."""
    from optuna.distributions import CategoricalDistribution

    grid = {}
    for key, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            grid[key] = list(dist.choices)
        elif getattr(dist, "step", None) and not getattr(dist, "log", False):
            count = int(round((dist.high - dist.low) / dist.step)) + 1
            grid[key] = [type(dist.low)(dist.low + i * dist.step) for i in range(count)]
        else:
            raise TunelabError(f"hydra/sweeper/sampler=grid needs a list for {key}: give choice(...) or range(...), "
                               f"not an interval")
    return grid


def suggest(trial, key: str, dist) -> Any:
    """Optuna's public suggest_* for a distribution (the plugin called the private `trial._suggest`)."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(key, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)
