"""Training: `imtune.train.loop.train(cfg) -> run directory`, and what it builds, tracks and saves."""
