"""`launcher.nproc=N`: start N data-parallel ranks of `lmtk train` on this machine.

What torchrun --standalone does, minus what gets in the way of a clean Ctrl-C: the ranks run
in a session of their own, so the terminal's Ctrl-C reaches this process alone, which passes
it on once. Every rank then finishes the same step (they agree on stopping in an all-reduce),
rank 0 writes the checkpoint and marks the run interrupted, and all exit 130 (143 for
SIGTERM) with one line from rank 0. A second Ctrl-C is passed on too (each rank exits at
once); ranks still alive 10 s later are killed. When one rank fails, the others (which would
wait forever in a collective) are stopped. No rank outlives this process: each one asks the
kernel to SIGTERM it when its parent dies (Linux)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

GRACE_S = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _threads_per_rank(nproc: int) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return str(max(1, cores // nproc))


def launch(nproc: int, args: list[str]) -> int:
    """Run `python -m lmtk ARGS` as ranks 0..nproc-1; returns the exit status for the command."""
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(nproc),
                LOCAL_WORLD_SIZE=str(nproc))
    base.setdefault("OMP_NUM_THREADS", _threads_per_rank(nproc))  # ranks share the cores (as torchrun does)
    procs = [
        subprocess.Popen([sys.executable, "-m", "lmtk", *args], env=dict(base, RANK=str(r), LOCAL_RANK=str(r)),
                         start_new_session=True, preexec_fn=_die_with_parent)
        for r in range(nproc)
    ]
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signum)
                except ProcessLookupError:
                    pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    deadline = None
    try:
        while any(p.poll() is None for p in procs):
            failed = any(p.returncode not in (None, 0) for p in procs)
            if deadline is None and (len(received) >= 2 or (failed and not received)):
                deadline = time.monotonic() + (GRACE_S if received else 2.0)
            if deadline is not None and time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.05)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    if received:
        return 128 + received[0]
    return codes[0] if codes[0] else next((c if c > 0 else 1 for c in codes if c), 0)
