"""The Dask task runner (``runner.kind: dask``): the per-file work of validation and preprocessing,
mapped over a real Dask cluster through Prefect's DaskTaskRunner, gives exactly the serial result."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO, write_simple_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_simple_dataset(tmp_path_factory.mktemp("dask") / "data", subjects=5, frames=4, seed=3)


def test_settings_choose_the_runner():
    from prefect_dask import DaskTaskRunner

    from flows.runner import chunked, make_mapper, task_runner
    from pipeline.config import RunnerParams

    assert make_mapper(RunnerParams(), "validate") is None  # the default: today's thread pool
    assert callable(make_mapper(RunnerParams(kind="dask"), "validate"))
    remote = task_runner(RunnerParams(kind="dask", dask_address="tcp://10.0.0.5:8786"))
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://10.0.0.5:8786"
    assert task_runner(RunnerParams(kind="dask", workers=3)).cluster_kwargs["n_workers"] == 3
    parts = chunked(list(range(10)), 4)
    assert sum(parts, []) == list(range(10)) and len(parts) == 4


def test_manifest_on_a_local_dask_cluster_equals_the_serial_one(dataset, prefect_server):
    from flows.runner import dask_mapper
    from pipeline.config import RunnerParams
    from pipeline.manifest import build_manifest

    (dataset / "train" / "2_3.tif").write_bytes(b"not an image")  # an odd file travels the same way
    serial = build_manifest(dataset)
    mapped = build_manifest(dataset, mapper=dask_mapper(RunnerParams(kind="dask", workers=2), "validate",
                                                        processes=False))
    pd.testing.assert_frame_equal(mapped, serial)
    assert not mapped.set_index("frame_id").loc["2_3", "image_decodes"]
    assert mapped.attrs["files_read"] == serial.attrs["files_read"] == 40


def test_preprocess_on_an_existing_dask_cluster_equals_the_serial_one(dataset, tmp_path, tiny_params, prefect_server):
    """``runner.dask_address`` pointing at a running scheduler (here a LocalCluster on loopback TCP)."""
    from distributed import Client, LocalCluster, get_task_stream

    from flows.runner import make_mapper
    from pipeline.config import RunnerParams
    from pipeline.preprocess import load_prepared, preprocess

    clean = write_simple_dataset(tmp_path / "clean", subjects=5, frames=4, seed=3)
    preprocess(clean, tmp_path / "serial", tiny_params, progress=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp",
                      host="127.0.0.1", dashboard_address=None) as cluster:
        runner = RunnerParams(kind="dask", dask_address=cluster.scheduler_address, workers=2)
        with Client(cluster) as client, get_task_stream(client=client) as stream:
            preprocess(clean, tmp_path / "dask", tiny_params, progress=False, mapper=make_mapper(runner, "preprocess"))
    # the work went through that scheduler, in chunks (not through the pipeline's own thread pool)
    assert len(stream.data) >= runner.workers, stream.data
    serial, mapped = load_prepared(tmp_path / "serial"), load_prepared(tmp_path / "dask")
    assert np.array_equal(serial.images, mapped.images) and np.array_equal(serial.masks, mapped.masks)
    pd.testing.assert_frame_equal(serial.frames, mapped.frames)
    assert serial.summary == mapped.summary


def _slow_square(x: int) -> int:
    """x * x, slowly; in the folder $NERVESEG_TEST_RUNNING names, a file says which process ran it."""
    import time
    from pathlib import Path

    Path(os.environ["NERVESEG_TEST_RUNNING"], f"{os.getpid()}-{x}").touch()
    time.sleep(0.1)
    return x * x


def test_manifest_with_worker_processes_equals_the_serial_one(dataset, prefect_server):
    """A LocalCluster of worker processes: every task is pickled and shipped to another process."""
    from flows.runner import dask_mapper
    from pipeline.config import RunnerParams
    from pipeline.manifest import build_manifest

    serial = build_manifest(dataset)
    mapped = build_manifest(dataset, mapper=dask_mapper(RunnerParams(kind="dask", workers=2), "validate",
                                                        processes=True))
    pd.testing.assert_frame_equal(mapped, serial)


@pytest.fixture(scope="module")
def dask_processes(tmp_path_factory):
    """`dask scheduler` and two `dask worker` processes on loopback, as on a real cluster (one cluster for
    the module: the test that kills a worker comes last, and one worker would do for the others too)."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.service_helpers import free_port, wait_for

    tmp_path = tmp_path_factory.mktemp("dask-cluster")
    dask = str(Path(sys.executable).with_name("dask"))
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = [open(tmp_path / f"dask-{i}.log", "w") for i in range(3)]
    running = tmp_path / "running"
    running.mkdir()
    # scheduler and workers import the project's code (and these tests' functions), as on any cluster
    env = {**os.environ, "PYTHONPATH": str(REPO), "NERVESEG_TEST_RUNNING": str(running)}
    scheduler = subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                  "--dashboard-address", ":0", "--no-show"], stdout=logs[0], stderr=subprocess.STDOUT,
                                 env=env)
    workers = [subprocess.Popen([dask, "worker", address, "--nthreads", "1", "--nworkers", "1", "--no-nanny",
                                 "--host", "127.0.0.1", "--dashboard-address", ":0"], stdout=log,
                                stderr=subprocess.STDOUT, env=env) for log in logs[1:]]
    try:
        from distributed import Client

        def ready():
            try:
                with Client(address, timeout=5) as client:
                    return len(client.scheduler_info()["workers"]) == 2
            except OSError:
                return False

        wait_for(ready, timeout=90, interval=0.2, what="the Dask scheduler and its two workers")
        yield address, workers, running
    finally:
        for process in (*workers, scheduler):
            process.kill()
            process.wait()
        for log in logs:
            log.close()


def test_manifest_against_a_separate_scheduler_and_workers_equals_the_serial_one(dataset, dask_processes,
                                                                                 prefect_server):
    from flows.runner import make_mapper
    from pipeline.config import RunnerParams
    from pipeline.manifest import build_manifest

    address, _, _ = dask_processes
    serial = build_manifest(dataset)
    mapped = build_manifest(dataset, mapper=make_mapper(RunnerParams(kind="dask", dask_address=address, workers=2),
                                                        "validate"))
    pd.testing.assert_frame_equal(mapped, serial)


def test_a_worker_killed_mid_run_leaves_no_silent_gap(dask_processes, prefect_server):
    """One of two workers dies while it runs a chunk (killed as soon as it starts one of the items): the
    scheduler gives its chunks to the other (or the chunk's retry runs them), and every item comes back,
    in order."""
    import threading
    import time

    from flows.runner import make_mapper
    from pipeline.config import RunnerParams

    address, workers, running = dask_processes
    victim, seen = workers[0], []
    mapper = make_mapper(RunnerParams(kind="dask", dask_address=address, workers=2), "validate")
    done = threading.Event()

    def kill_when_it_runs_an_item():
        while not done.is_set():
            seen[:] = [p.name for p in running.iterdir() if p.name.startswith(f"{victim.pid}-")]
            if seen:
                victim.kill()
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_when_it_runs_an_item, daemon=True)
    killer.start()
    began = time.monotonic()
    try:
        results = mapper(_slow_square, list(range(40)))
    finally:
        done.set()
        killer.join(timeout=10)
    assert seen and victim.poll() is not None, "the worker was not killed while the chunks ran"
    assert results == [x * x for x in range(40)]
    assert time.monotonic() - began < 120
