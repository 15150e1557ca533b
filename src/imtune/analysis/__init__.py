"""Data analysis: statistics, findings and the advice of `imtune data stats`."""
