"""Studies: the ledger of a sweep's trials (one CSV per sweep dir), what a re-run does with each trial, the part of
a trial that records itself, where an Optuna study lives (storage) and how a trial reports to its pruner."""
