"""Run directories: the one reader, the run log, the single-writer guard, checkpoints and their integrity."""
