"""The driver of the 2026-12-02 frontier sweeps (run_frontier with a reduced sweep):

    python driver.py OUT SEEDS PROTOCOLS SEVERITIES RULES SWEEP_JSON [WORKERS]

`cema-deploy demo --frontier --sweep ...` does the same from the CLI.
"""

import json
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    from cema_deploy.demo.frontier import run_frontier

    out, seeds, protocols, sevs, rules, sweep = sys.argv[1:7]
    t0 = time.time()
    paths = run_frontier(
        Path(out),
        rules=rules.split(","),
        protocols=protocols.split(","),
        severities=[int(s) for s in sevs.split(",")],
        seeds=[int(s) for s in seeds.split(",")],
        default="random",
        workers=int(sys.argv[7]) if len(sys.argv) > 7 else 2,
        sweep={k: tuple(v) for k, v in json.loads(sweep).items()},
        on_step=lambda m: print(f"[{time.time() - t0:7.0f}s] {m}", flush=True),
    )
    print(paths, f"{time.time() - t0:.0f}s")
