"""Studies: the ledger of a sweep's trials (one CSV per sweep dir), what a re-run does with each trial,
and the part of a trial that records itself."""
