"""Data: files -> records -> Conversations -> rendered text -> token ids with per-token weights -> batches."""
