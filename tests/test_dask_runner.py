"""The Dask task runner (``runner.kind: dask``): the per-file work of validation and preprocessing,
mapped over a real Dask cluster through Prefect's DaskTaskRunner, gives exactly the serial result."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.conftest import write_simple_dataset


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
    from distributed import LocalCluster

    from flows.runner import make_mapper
    from pipeline.config import RunnerParams
    from pipeline.preprocess import load_prepared, preprocess

    clean = write_simple_dataset(tmp_path / "clean", subjects=5, frames=4, seed=3)
    preprocess(clean, tmp_path / "serial", tiny_params, progress=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp",
                      host="127.0.0.1", dashboard_address=None) as cluster:
        runner = RunnerParams(kind="dask", dask_address=cluster.scheduler_address, workers=2)
        preprocess(clean, tmp_path / "dask", tiny_params, progress=False, mapper=make_mapper(runner, "preprocess"))
    serial, mapped = load_prepared(tmp_path / "serial"), load_prepared(tmp_path / "dask")
    assert np.array_equal(serial.images, mapped.images) and np.array_equal(serial.masks, mapped.masks)
    pd.testing.assert_frame_equal(serial.frames, mapped.frames)
    assert serial.summary == mapped.summary
