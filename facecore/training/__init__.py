"""One pure step function per model and phase: ``step(models, opts, batch, cfg) -> dict``.

No framework code here: ``jobs.train`` wraps these in Ray Train.
"""
