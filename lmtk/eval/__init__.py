"""Evaluation: one path for training's validation and (later) `lmtk eval`."""
