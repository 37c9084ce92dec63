"""Turning a composed config into a run: the one assembler."""
