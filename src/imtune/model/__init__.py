"""Models: sources (default, random:, local, hub), the one forward pass, the one loss, precision, generation."""
