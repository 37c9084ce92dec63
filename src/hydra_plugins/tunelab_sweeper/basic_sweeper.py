"""Hydra's basic (grid) sweeper behind the study ledger: re-running the same command with the same
`hydra.sweep.dir` skips finished trials, resumes interrupted ones, retries failed ones only with
`ledger.retry_failed=true`, and refuses a changed grid before anything runs (tunelab.study.launcher).
The default sweeper of tunelab-train (conf/hydra/sweeper/ledger_basic.yaml).
"""

from __future__ import annotations

import itertools

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper


class LedgerBasicSweeper(BasicSweeper):
    def setup(self, *, hydra_context, task_function, config) -> None:
        from tunelab.cli.common import die
        from tunelab.errors import TunelabError
        from tunelab.study.launcher import check_launcher, wrap  # here: Hydra imports this module on every start

        try:
            check_launcher(config)  # one line, before any sweep dir exists, when the launcher cannot start
        except TunelabError as err:
            die(str(err), err.exit_code)
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.launcher = wrap(self.launcher, config)

    def get_job_batch(self):
        from tunelab.study.launcher import LedgerLauncher, check_grid

        if self.batch_index == 0 and isinstance(self.launcher, LedgerLauncher):
            check_grid(self.launcher.sweep_dir, dict(enumerate(itertools.chain(*self.overrides))))
        return super().get_job_batch()

    def sweep(self, arguments):
        from tunelab.cli.common import die
        from tunelab.errors import TunelabError

        try:
            returns = super().sweep(arguments)
        except TunelabError as err:  # a changed grid (nothing launched), a launcher that failed, a trial lost
            print(summary(self.launcher), flush=True)
            die(str(err), err.exit_code)
        except BaseException:
            print(summary(self.launcher), flush=True)
            raise
        print(summary(self.launcher), flush=True)
        return returns


def summary(launcher) -> str:
    return launcher.summary() if hasattr(launcher, "summary") else "study ledger: off (ledger.enabled=false)"
