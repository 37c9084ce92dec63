"""Config values checked before anything slow starts, and the options a `_target_` takes."""
