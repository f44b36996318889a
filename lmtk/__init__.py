"""lmtk: train small language models on one GPU (or a laptop)."""

__version__ = "0.1.0"
