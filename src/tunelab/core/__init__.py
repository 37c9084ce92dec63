"""Method-free primitives every method, the evaluator and the tools share: losses, inference, generation."""
