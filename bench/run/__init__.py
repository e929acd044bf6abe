"""One training run and its samples: the training loop (``train``), its distributed engine, checkpoints, EMA,
per-step batches, preemption, the training log, and class-conditional sampling from the run (``sample``)."""
