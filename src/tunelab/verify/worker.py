"""`python -m tunelab.verify.worker OUT.json RUN_DIR OVERRIDES...`: one short fit, its trace written by rank 0.

A separate process because Lightning's DDP launcher starts the other ranks by re-running the
command that started this one."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    from tunelab.run.quiet import quiet_libraries
    from tunelab.run.compose import compose_job
    from tunelab.verify.runner import short_fit

    quiet_libraries()
    out, run_dir, overrides = Path(argv[0]), Path(argv[1]), argv[2:]
    trace = short_fit(compose_job("train", overrides, run_dir), run_dir)
    if trace.module.trainer.is_global_zero:
        out.write_text(json.dumps(trace.as_dict()))


if __name__ == "__main__":
    main(sys.argv[1:])
