"""`lmtk finetune`: a trained model (the base) -> a new run, on a labelled task or on text."""
