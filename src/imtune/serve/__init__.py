"""`imtune serve`: an OpenAI-compatible chat-completions server (the app and its request model)."""
