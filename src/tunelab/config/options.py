"""The options a `_target_` config node takes, so an unknown key is one line that lists the real ones.

Hydra passes every key of a `_target_` node to the target as a keyword argument, so a misspelt key
(`+optimizer.lrr=1`) fails only when the target is called: for the optimizer, inside Lightning's
configure_optimizers, as `TypeError: AdamW.__init__() got an unexpected keyword argument`.
"""

from __future__ import annotations

import difflib
import importlib
import inspect

from omegaconf import DictConfig, OmegaConf

from tunelab.errors import TunelabError

KEYWORD_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
# Keys of a node that the assembler takes out before the target is called: LoRA+'s ratio and the adapter's learning
# rate are optimizer settings kept beside PEFT's LoraConfig fields (models.adapters.build_adapter); an evaluator's
# `headline` is the metric sweeps optimise (config.derived).
READ_BEFORE_TARGET = {"adapter": {"loraplus_lr_ratio", "lr"}, "eval": {"headline"}, "method.evaluator": {"headline"}}


def is_hydra_key(name: str) -> bool:
    """_target_, _partial_, _convert_, ...: read by Hydra, never passed to the target."""
    return name.startswith("_") and name.endswith("_")


def keyword_parameters(target) -> list[inspect.Parameter] | None:
    """The keyword parameters of a callable, or None when it takes any keyword. A class that passes
    **kwargs on to its base (PreferenceDataModule -> DataModule) takes the base's too."""
    if inspect.isclass(target):
        chain = [klass.__init__ for klass in target.__mro__ if "__init__" in vars(klass) and klass is not object]
    else:
        chain = [target]
    parameters = []
    for function in chain:
        signature = inspect.signature(function)
        parameters += [p for p in signature.parameters.values() if p.kind in KEYWORD_KINDS and p.name != "self"]
        if all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
            return parameters
    return None


def locate(path: str) -> tuple[object | None, str | None]:
    """(the object a dotted `_target_` names, None), or (None, why not) in a few words; unlike Hydra's
    get_object it logs nothing, so a bad target is the caller's one line and not three."""
    parts = str(path).split(".")
    for split in range(len(parts), 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
                continue  # this prefix is no module: the rest is an attribute path
            return None, f"importing {module_name} fails: {err}"
        except Exception as err:  # the module exists but its own import fails
            return None, f"importing {module_name} fails: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
        for depth, attr in enumerate(parts[split:], start=split):
            if not hasattr(obj, attr):
                return None, f"{'.'.join(parts[:depth])} has no attribute {attr!r}"
            obj = getattr(obj, attr)
        return obj, None
    return None, f"no module named {parts[0]!r}"


def target_parameters(target_path: str) -> list[inspect.Parameter] | None:
    """None where the target cannot be inspected here (not installed, **kwargs): its call will tell."""
    target, _ = locate(target_path)
    if target is None:
        return None
    try:
        return keyword_parameters(target)
    except Exception:  # a C callable without a signature
        return None


def listed_options(parameters: list[inspect.Parameter], node: DictConfig | None) -> list[str]:
    """What a user may set: parameters with a default, and those the config sets. A required parameter
    the config leaves out is one the code passes itself (the optimizer's params, the data's tokenizer).
    Without the node (a target that already failed), every parameter."""
    present = set(node or {})
    names = [p.name for p in parameters
             if node is None or p.default is not inspect.Parameter.empty or p.name in present]
    return list(dict.fromkeys(names))  # a subclass and its base may both name one (tokenization)


def no_such_option(path: str, name: str, options: list[str]) -> str:
    message = f"{path} has no option '{name}'; its options are: {', '.join(options)}"
    close = difflib.get_close_matches(name, options, n=1)
    return message + (f"; did you mean {path}.{close[0]}?" if close else "")


def unknown_key_error(cfg: DictConfig, key: str) -> TunelabError | None:
    """The error for a `key` the user set under a `_target_` node (the deepest one above it) whose
    target does not take it; None for any other key."""
    parts = key.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        path = ".".join(parts[:depth])
        node = OmegaConf.select(cfg, path, default=None)
        if isinstance(node, DictConfig) and "_target_" in node:
            return option_error(path, node, parts[depth])
    return None


def option_error(path: str, node: DictConfig, name: str) -> TunelabError | None:
    if is_hydra_key(name) or name in READ_BEFORE_TARGET.get(path, ()):
        return None
    parameters = target_parameters(str(node._target_))
    if parameters is None or name in {p.name for p in parameters}:
        return None
    new = renamed_option(str(node._target_), name)
    if new is not None:
        return TunelabError(f"{path}.{name} is now {path}.{new}")
    return TunelabError(no_such_option(path, name, listed_options(parameters, node)))


def renamed_option(target_path: str, name: str) -> str | None:
    """The name an option took when its target was reshaped (a target lists them in RENAMED_OPTIONS, with why)."""
    from hydra.utils import get_object

    try:
        renamed = getattr(get_object(target_path), "RENAMED_OPTIONS", {})
    except Exception:
        return None
    return renamed.get(name)
