"""Training: the one loop (loop.py) and what drives it (budget, schedule, optim)."""
