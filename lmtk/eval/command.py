"""`lmtk eval TARGET... [key=value ...]`: load each target once, run the suites, write
eval/<suite>.json, print the tables."""

from __future__ import annotations

import sys
import time

import torch

from lmtk.errors import UserError


def run(specs: list[str], plan) -> list[dict]:
    from lmtk.eval import suite_module
    from lmtk.eval import results as res
    from lmtk.eval.target import load
    from lmtk.log import console

    if not specs:
        raise UserError("lmtk eval needs a run: lmtk eval RUN [RUN ...] [suite=ppl] (`lmtk runs` lists them)")
    mods = {s: suite_module(s) for s in plan.suites}  # a suite not available fails before any loading
    for s, mod in mods.items():
        if hasattr(mod, "check"):  # bad input (missing files, ...) fails before any model loads
            mod.check(plan.configs[s])
    top = plan.top
    out = []
    n, k = len(specs) * len(plan.suites), 0
    for spec in specs:
        target = load(spec, root=top.root, device=top.device, precision=top.precision, seed=top.seed)
        for suite in plan.suites:
            k += 1
            if n > 1:  # several runs or suites: say which one is running
                console.print(f"eval {k}/{n}: {suite} on {target.name}", markup=False, soft_wrap=True)
            torch.manual_seed(top.seed)
            t0 = time.perf_counter()
            result = mods[suite].run(target, plan.configs[suite])
            data = res.payload(target, suite, result, plan.configs[suite], time.perf_counter() - t0)
            path = res.write(target.out_dir, data)
            console.print(f"{target.name}: {suite} -> {path}", markup=False, soft_wrap=True)
            out.append(data)
        del target
    console.file = sys.stdout
    for t in res.tables(out):
        console.print(t)
    return out
