"""The registered model's compact serving form (pipeline/serving.py, docs/decisions/0019): frames as
PNG/TIFF files (base64 in JSON) in, masks as PNG or run-length encoding out, beside the tensor form.

A tiny untrained network logged through ``registry.log_model`` as the product logs it; in process
through ``mlflow.pyfunc.load_model``, then once over HTTP with a real ``mlflow models serve``."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest

from pipeline.rle import rle_encode
from pipeline.serving import decode_png_answer, encode_image

from .conftest import REPO, tiny_model_config
from .service_helpers import free_port, invoke_when_up


def _frames(n: int, size=(420, 580), seed: int = 0) -> np.ndarray:
    """Speckle with a dark ellipse, like the phantom's frames."""
    rng = np.random.default_rng(seed)
    out = rng.rayleigh(60, (n, *size)).clip(0, 255).astype(np.uint8)
    for i, frame in enumerate(out):
        cv2.ellipse(frame, (size[1] // 2 + 20 * i, size[0] // 2), (size[1] // 10, size[0] // 10), 0, 0, 360, 20, -1)
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(model URI, tracking URI, loaded pyfunc) of a tiny network whose masks cover about a tenth of a frame."""
    import mlflow
    import torch

    from pipeline import registry
    from pipeline.inference import Postprocess, Predictor, write_bundle
    from pipeline.model import build_model

    tmp = tmp_path_factory.mktemp("serving")
    config = tiny_model_config("batch")
    torch.manual_seed(0)
    network = build_model(config).eval()
    torch.save(network.state_dict(), tmp / "weights.pt")
    probs, _ = Predictor(network, config, Postprocess()).probabilities(_frames(2))
    post = Postprocess(mask_threshold=float(np.quantile(probs, 0.9)), presence_threshold=0.0)
    bundle = write_bundle(tmp / "bundle", tmp / "weights.pt", config, post)
    experiment = registry.configure(tmp / "mlflow", "serving")
    with mlflow.start_run(experiment_id=experiment) as run:
        pass
    uri = registry.log_model(run.info.run_id, bundle, _frames(1))
    return uri, registry.tracking_uri(tmp / "mlflow"), mlflow.pyfunc.load_model(uri)


def test_png_and_rle_answers_are_the_tensor_forms_masks(served):
    _, _, model = served
    frames = _frames(3)
    masks = model.predict(frames)  # the tensor form, as before
    assert masks.shape == (3, 420, 580) and masks.dtype == np.uint8
    assert 0 < masks.mean() < 0.5  # masks with something in them: the comparisons below mean something
    request = pd.DataFrame({"image": [encode_image(f) for f in frames]})  # several frames in one request
    pngs = model.predict(request)  # images in: PNG out by default
    assert len(pngs) == 3 and all(isinstance(p, str) for p in pngs)
    assert all(np.array_equal(decode_png_answer(p), m) for p, m in zip(pngs, masks))
    assert model.predict(request, params={"output": "rle"}) == [rle_encode(m) for m in masks]
    assert np.array_equal(model.predict(request, params={"output": "tensor"}), masks)
    # frames in, PNG asked for: the same masks
    assert np.array_equal(decode_png_answer(model.predict(frames, params={"output": "png"})[0]), masks[0])


def test_tiff_frames_of_any_size_in_one_request(served):
    _, _, model = served
    native, small = _frames(1)[0], _frames(1, size=(210, 290), seed=1)[0]
    tiffs = [encode_image(native, ".tif"), cv2.imencode(".tif", small)[1].tobytes()]  # base64 text, or bytes
    answers = model.predict({"image": tiffs}, params={"output": "png"})  # {"inputs": {"image": [...]}}
    assert [decode_png_answer(a).shape for a in answers] == [(420, 580), (210, 290)]
    assert np.array_equal(decode_png_answer(answers[0]), model.predict(native[None])[0])
    assert np.array_equal(decode_png_answer(answers[1]), model.predict(small[None])[0])
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="different sizes"):
        model.predict({"image": tiffs}, params={"output": "tensor"})


def test_what_the_model_refuses_and_what_its_signature_says(served):
    from mlflow.exceptions import MlflowException

    _, _, model = served
    params = {p.name: p.default for p in model.metadata.get_params_schema().params}
    assert params == {"output": "auto"} and model.metadata.get_input_schema() is None
    assert set(model.metadata.metadata["nerveseg.serving"]["inputs"]) == {"tensor", "image"}
    with pytest.raises(MlflowException, match="8-bit integers"):
        model.predict(_frames(1).astype(np.float32))  # as the former uint8 TensorSpec refused it
    with pytest.raises(MlflowException, match="one of auto, tensor, png, rle"):
        model.predict(_frames(1), params={"output": "jpeg"})
    with pytest.raises(MlflowException, match="image 0: not a readable image"):
        model.predict(pd.DataFrame({"image": [base64.b64encode(b"not an image").decode()]}))


def _docs_curl_command() -> str:
    """The compact-form curl pipeline of docs/operations.md, continuation lines joined."""
    text = (REPO / "docs" / "operations.md").read_text()
    block = re.search(r"\n(base64 -w0 frame\.tif(?:[^\n]*\\\n)*[^\n]*)", text)
    assert block, "docs/operations.md shows no `base64 -w0 frame.tif | ...` call"
    return block.group(1).replace("\\\n", " ")


def test_the_model_server_answers_the_compact_form_as_the_docs_show(served, tmp_path):
    uri, tracking_uri, model = served
    frame = _frames(1)[0]
    cv2.imwrite(str(tmp_path / "frame.tif"), frame)
    expected = model.predict(frame[None])[0]
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
           # the server execs `uvicorn` from PATH: the environment's bin, as with an activated venv
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        # The JSON body the docs' `jq -Rs` builds from `base64 -w0 frame.tif`.
        body = {"inputs": {"image": [base64.b64encode((tmp_path / "frame.tif").read_bytes()).decode()]},
                "params": {"output": "png"}}
        answer = invoke_when_up(port, body, server)
        assert np.array_equal(decode_png_answer(answer["predictions"][0]), expected)

        if not (shutil.which("curl") and shutil.which("jq") and shutil.which("base64")):
            return  # the docs' shell pipeline needs them; the body above is the one it builds
        command = _docs_curl_command().replace("127.0.0.1:5001", f"127.0.0.1:{port}")
        done = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        written = cv2.imread(str(tmp_path / "mask.png"), cv2.IMREAD_GRAYSCALE)
        assert np.array_equal((written > 0).astype(np.uint8), expected)
    finally:
        server.terminate()
        server.wait(timeout=30)
