"""captioner: attention LSTM image captioning on a frozen, hooked torchvision CNN."""

__version__ = "0.1.0"
