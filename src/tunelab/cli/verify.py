"""`tunelab-verify [train overrides] [verify.KEY=VALUE]`: paired short trainings that must agree.

Train overrides compose the run exactly as `tunelab-train` would; `verify.*` values (conf/verify.yaml)
choose the pairs, their sizes and tolerances. Exit 0 when no pair fails, 1 when one does, 2 on bad input.
"""

from __future__ import annotations

import logging
import sys
import warnings

from tunelab.cli.common import die, one_line, preflight, quiet_libraries
from tunelab.errors import TunelabError
from tunelab.paths import CONF_DIR

USAGE = __doc__


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(train overrides, verify overrides without their `verify.` prefix)."""
    train = [a for a in argv if not a.startswith("verify.")]
    ours = [a.removeprefix("verify.") for a in argv if a.startswith("verify.")]
    return train, ours


def load_settings(overrides: list[str]):
    from omegaconf import OmegaConf

    settings = OmegaConf.load(CONF_DIR / "verify.yaml")
    OmegaConf.set_struct(settings, True)
    try:
        return OmegaConf.merge(settings, OmegaConf.from_dotlist(overrides))
    except Exception as err:  # an unknown key or a bad value
        raise TunelabError(f"bad verify setting ({one_line(err)}); the settings are in conf/verify.yaml") from None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return
    quiet_libraries()
    from tunelab.verify import run_pairs
    from tunelab.verify.report import print_results

    # After the imports: Lightning sets its loggers to INFO when imported; dozens of short fits
    # would otherwise bury the table under "GPU available" lines.
    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # The resumed side deliberately leaves the checkpoint callback out; exports need no progress bars.
    warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint.*")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    train_args, verify_args = split_args(argv)
    try:
        settings = load_settings(verify_args)
        preflight(train_args, "train")
        results = run_pairs(train_args, settings)
    except TunelabError as err:
        die(str(err), err.exit_code)
    print_results(results)
    failed = [r.name for r in results if r.status == "FAIL"]
    if failed:
        print(f"verify: {len(failed)} pair(s) failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
