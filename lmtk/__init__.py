"""lmtk: train small language models on one GPU (or a laptop)."""

__version__ = "0.1.0"

import os as _os

# OpenMP threads busy-wait by default; on a laptop or a shared CPU that made small-model
# training 2-8x slower (bench/RESULTS.md). Must be set before torch is imported.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
