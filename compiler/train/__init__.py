"""The CPU training backend: executor, solver, learning-rate schedule, trainer and checkpoints."""
