"""Serving: the Triton repository writer (configs as ModelConfig messages), the server launcher, model
control (hot reload, watchdog), streaming direction updates."""
