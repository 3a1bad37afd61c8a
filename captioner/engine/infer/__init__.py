"""Inference: checkpoints as plain data, the Predictor (a checkpoint ready to caption on a device), the one decode
path (images or features -> captions) and encoder features into the feature cache."""
