"""Telling a run that has collapsed: for `collapse_patience` updates in a row, either every group's rewards were
all equal (no completion better than its siblings: no learning signal left, `frac_reward_zero_std` 1.0) or the
mean completion length was below `collapse_min_length` tokens (the policy answers with next to nothing).

experiments/method_comparison found a GRPO seed that answered "1" to every question by reading its samples;
this is the check that would have said so."""

from __future__ import annotations


class CollapseWatch:
    def __init__(self, patience: int, min_length: float | None):
        self.patience, self.min_length = patience, min_length
        self.streak = 0
        self.collapsed_at: int | None = None  # the optimizer step at which the streak reached `patience`
        self.reason = ""

    def signs(self, zero_std_share: float | None, mean_length: float) -> list[str]:
        found = []
        if zero_std_share is not None and zero_std_share >= 1.0:
            found.append("every group's rewards were equal (no learning signal)")
        if self.min_length is not None and mean_length < self.min_length:
            found.append(f"mean completion length {mean_length:.2f} tokens < collapse_min_length={self.min_length}")
        return found

    def observe(self, step: int, zero_std_share: float | None, mean_length: float) -> bool:
        """Counts this update; True once, at the update that makes the streak `patience` long."""
        found = self.signs(zero_std_share, mean_length)
        self.streak = self.streak + 1 if found else 0
        if self.collapsed_at is None and self.patience > 0 and self.streak >= self.patience:
            self.collapsed_at = step
            self.reason = f"{' and '.join(found)} for {self.streak} updates in a row"
            return True
        return False
