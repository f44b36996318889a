"""`lmtk distill`: a Transformer teacher into a student with subquadratic mixers.

run.py the command; transfer.py the weight transfer (distill.init); stages.py the stages as one
objective of the one loop (distill.stages); kd.py the per-token KD loss with both heads fused."""
