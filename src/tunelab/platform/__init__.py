"""Where a run computes: device and precision for `auto`, and sharding over processes."""
