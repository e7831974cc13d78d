"""Orchestration overhead of the quickstart flow, and the time of a no-op run.

    python bench/flow_overhead.py [--project DIR] [--settings tiny]

Clones the repository's committed state into a temporary folder (or uses ``--project``),
generates and versions the phantom, runs the retraining flow once, and compares the flow run's
wall time with the sum of its task runs' own run times, both read back from Prefect's API. Then
times ``nerveseg run`` in a new process with nothing changed (skipped: trains nothing; Prefect
start included), as an operator would run it.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


async def run_times(flow_run_id) -> tuple[float, list[tuple[str, float]]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        flow_run = await client.read_flow_run(flow_run_id)
        tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    wall = (flow_run.end_time - flow_run.start_time).total_seconds()
    return wall, sorted(((t.name, t.total_run_time.total_seconds()) for t in tasks), key=lambda r: -r[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", help="an existing project folder (default: a fresh clone in /tmp)")
    args = parser.parse_args()
    project = Path(args.project) if args.project else Path(tempfile.mkdtemp(prefix="nerveseg-overhead-")) / "p"
    if not args.project:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(project)], check=True)

    from flows.environment import configure_environment

    configure_environment(project)
    from flows.quickstart import ensure_versioned_phantom
    from flows.retrain import retrain

    ensure_versioned_phantom(project)
    began = time.perf_counter()
    state = retrain(project_dir=str(project), force=True, return_state=True)
    outside = time.perf_counter() - began
    if not state.is_completed():
        print(f"the flow run ended {state.name}: {state.message}", file=sys.stderr)
        return 1
    wall, tasks = asyncio.run(run_times(state.state_details.flow_run_id))
    task_sum = sum(seconds for _, seconds in tasks)

    nerveseg = Path(sys.executable).with_name("nerveseg")
    t0 = time.perf_counter()
    done = subprocess.run([str(nerveseg), "run", "-C", str(project)], capture_output=True, text=True)
    noop = time.perf_counter() - t0
    skipped = "skipped" in (done.stdout + done.stderr)

    print(f"project {project}; {platform.processor() or platform.machine()}\n")
    print("| task | run time (s) |\n|---|---:|")
    for name, seconds in tasks:
        print(f"| {name} | {seconds:.1f} |")
    print(f"| **sum of tasks** | **{task_sum:.1f}** |")
    print(f"\nflow run wall time (Prefect's start to end): {wall:.1f} s; as the caller saw it: {outside:.1f} s")
    print(f"overhead ratio flow / sum of tasks: {wall / task_sum:.3f} (target <= 1.15)")
    print(f"no-op `nerveseg run` (new process, Prefect start included): {noop:.1f} s, "
          f"{'skipped as expected' if skipped and done.returncode == 0 else f'UNEXPECTED rc={done.returncode}'}")
    if not args.project:
        shutil.rmtree(project.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
