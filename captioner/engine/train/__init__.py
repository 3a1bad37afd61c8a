"""Training: the one training step and its losses (cross-entropy, SCST), learning-rate schedules, a run's state and
resume, its inputs (cache, precomputed features or images), validation and its folder."""
