"""Where the per-file work of validation and preprocessing runs (``runner:`` in ``params.yaml``).

``kind: thread`` (default): ``pipeline`` reads, decodes and hashes the files in a thread pool of the
flow's own process, as it always did. ``kind: dask``: the files are cut into chunks and each chunk is a
Prefect task run, mapped over a Dask cluster by ``prefect_dask.DaskTaskRunner`` in a subflow
(``map-files``): a local cluster of ``runner.workers`` workers, or an existing cluster at
``runner.dask_address``. The per-file units are ``pipeline.manifest.read_file_fields`` and
``pipeline.preprocess.load_pair``; ``pipeline/`` stays free of Prefect and only receives a mapper.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline.config import RunnerParams

Mapper = Callable[[Callable[[Any], Any], Sequence[Any]], list]
CHUNKS_PER_WORKER = 4


@task(name="map-files-chunk", cache_policy=NO_CACHE, persist_result=False, retries=1, retry_delay_seconds=2)
def _chunk(fn: Callable[[Any], Any], items: list) -> list:
    return [fn(item) for item in items]


def task_runner(runner: RunnerParams, **cluster_kwargs):
    """The DaskTaskRunner for these settings: the existing cluster at ``dask_address``, or a local one."""
    from prefect_dask import DaskTaskRunner

    if runner.dask_address:
        return DaskTaskRunner(address=runner.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": runner.workers, "threads_per_worker": 1,
                                          "dashboard_address": None, **cluster_kwargs})


class DaskChunkError(RuntimeError):
    """A chunk of files failed on the Dask cluster after its retry (a worker died twice, say)."""


def _name(item: Any) -> str:
    """A file's name for a message: the item itself, or the first path-like field of a row."""
    if hasattr(item, "_asdict"):
        values = list(item._asdict().values())
    else:
        values = list(item) if isinstance(item, (tuple, list)) else [item]
    for value in values:
        if isinstance(value, str) or hasattr(value, "__fspath__"):
            return str(value)
    return str(item)[:80]


def chunked(items: Sequence[Any], n_chunks: int) -> list[list]:
    size = max(1, math.ceil(len(items) / max(1, n_chunks)))
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def dask_mapper(runner: RunnerParams, label: str, **cluster_kwargs) -> Mapper:
    """A mapper that runs ``fn`` over ``items`` on Dask through a Prefect subflow; results in order."""

    def mapper(fn: Callable[[Any], Any], items: Sequence[Any]) -> list:
        if not items:
            return []
        chunks = chunked(items, runner.workers * CHUNKS_PER_WORKER)
        where = runner.dask_address or f"a local Dask cluster of {runner.workers} workers"

        @flow(name=f"map-files-{label}", task_runner=task_runner(runner, **cluster_kwargs), log_prints=False,
              validate_parameters=False)
        def map_files() -> list:
            began = time.perf_counter()
            futures = [_chunk.submit(fn, chunk) for chunk in chunks]
            out = []
            for chunk, future in zip(chunks, futures):
                try:
                    out.extend(future.result())
                except Exception as exc:  # a chunk that failed even after its retry: say which files
                    raise DaskChunkError(f"{label}: {len(chunk)} files ({_name(chunk[0])} ... {_name(chunk[-1])}) "
                                         f"could not be processed on {where}: {type(exc).__name__}: {exc}") from exc
            get_run_logger().info("%s: %d files in %d chunks on %s in %.1f s", label, len(items), len(chunks),
                                  where, time.perf_counter() - began)
            return out

        results = map_files()
        if len(results) != len(items):
            raise RuntimeError(f"{label}: the Dask runner returned {len(results)} results for {len(items)} files")
        return results

    return mapper


def make_mapper(runner: RunnerParams, label: str) -> Mapper | None:
    """None for ``kind: thread`` (the pipeline's own thread pool), a Dask mapper for ``kind: dask``."""
    return dask_mapper(runner, label) if runner.kind == "dask" else None
