"""Serving at the model's own speed: the tensor form and the compact forms, in process and over HTTP.

    python bench/serve_http.py [--model URI (--tracking-uri URI | --project DIR)] [--untrained params|tiny]
                               [--requests 30] [--batch 8] [--threads 0] [--out bench/results/serve_http.json]

For each form of a request of one native 420x580 frame (the tensor form ``{"inputs": [[[...]]]}``; the
image form ``{"inputs": {"image": ["<base64 TIFF or PNG>"]}}`` answered as a PNG or run-length encoding;
the same through ``dataframe_split``) it times, median and p90 ms per request:

- **in process**: ``mlflow.pyfunc.load_model(uri).predict`` on the decoded input (the model alone);
- **scoring**: MLflow's scoring function (``mlflow.pyfunc.scoring_server.invocations``) on the JSON body,
  in process: the server's parsing, the model and the JSON answer, without HTTP;
- **HTTP**: ``mlflow models serve -m URI --env-manager local`` started here on a free loopback port, one
  keep-alive connection; from the frame in hand (array, or the file's bytes) to the mask decoded
  into an array, the client's JSON work included;

and frames/s over HTTP for one request of ``--batch`` frames. Frames: the real test frames of
``../shared/datasets/kaggle-uns/test`` (their TIFF files as sent) when present, else random ones.

Without ``--model`` it registers an untrained network of params.yaml (``--untrained params``, the real
size: speed does not depend on the weights) or a tiny one (``tiny``, a smoke run) in a temporary store;
its mask threshold is the 90th percentile of its probabilities, so that masks cover about a tenth of a
frame, not nothing. With ``--project DIR`` (a project where ``nerveseg quickstart`` ran) the model
defaults to that project's champion.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REAL = ROOT.parent / "shared" / "datasets" / "kaggle-uns" / "test"
DEFAULT_OUT = ROOT / "bench" / "results" / "serve_http.json"


def load_frames(n: int) -> tuple[list[np.ndarray], list[bytes]]:
    """``n`` native frames and their TIFF files' bytes (as a client would send them)."""
    import cv2

    paths = sorted(REAL.glob("*.tif"), key=lambda p: p.name)[:n] if REAL.is_dir() else []
    if len(paths) == n:
        tiffs = [p.read_bytes() for p in paths]
        return [cv2.imdecode(np.frombuffer(t, np.uint8), cv2.IMREAD_GRAYSCALE) for t in tiffs], tiffs
    rng = np.random.default_rng(0)
    frames = [cv2.GaussianBlur(rng.integers(0, 255, (420, 580), dtype=np.uint8), (5, 5), 0) for _ in range(n)]
    return frames, [cv2.imencode(".tif", f)[1].tobytes() for f in frames]


def register_untrained(kind: str, folder: Path, frames: list[np.ndarray]) -> str:
    """Log an untrained network (params.yaml's or a tiny one) in a SQLite store under ``folder``;
    returns its ``models:/`` URI (the tracking URI is set in this process and in ``MLFLOW_TRACKING_URI``)."""
    import mlflow
    import torch

    from pipeline import registry
    from pipeline.config import load_params
    from pipeline.inference import Postprocess, Predictor, write_bundle
    from pipeline.model import ModelConfig, build_model
    from pipeline.train import model_config

    if kind == "tiny":
        config = ModelConfig(depth=2, base_width=8, dropout=0.0, height=32, width=44, intensity_mean=0.3,
                             intensity_std=0.2, norm="batch")
    else:
        params = load_params(ROOT / "params.yaml")
        config = model_config(params, params.preprocess.height, params.preprocess.width, 0.3, 0.2)
    torch.manual_seed(0)
    network = build_model(config).eval()
    torch.save(network.state_dict(), folder / "weights.pt")
    probs, _ = Predictor(network, config, Postprocess()).probabilities(np.stack(frames[:2]))
    post = Postprocess(mask_threshold=float(np.quantile(probs, 0.9)), presence_threshold=0.0)
    bundle = write_bundle(folder / "bundle", folder / "weights.pt", config, post)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("serve-http", artifact_location=(folder / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        pass
    return registry.log_model(run.info.run_id, bundle, frames[0][None])


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def cases(frames: list[np.ndarray], tiffs: list[bytes]) -> list[dict]:
    """Each form: how a client builds the body from what it holds, and reads the masks back."""
    import cv2

    from pipeline.rle import rle_decode
    from pipeline.serving import decode_png_answer

    pngs = [cv2.imencode(".png", f)[1].tobytes() for f in frames]
    shape = frames[0].shape

    def image_body(files, output):
        return {"inputs": {"image": [b64(f) for f in files]}, "params": {"output": output}}

    return [
        {"name": "tensor -> tensor", "frames": frames, "model_input": lambda fs: np.stack(fs), "params": None,
         "body": lambda fs: {"inputs": np.stack(fs).tolist()},
         "masks": lambda answer: np.asarray(answer, dtype=np.uint8)},
        {"name": "TIFF -> PNG", "frames": tiffs, "params": {"output": "png"}, "body": lambda fs: image_body(fs, "png"),
         "masks": lambda answer: [decode_png_answer(a) for a in answer]},
        {"name": "PNG -> PNG", "frames": pngs, "params": {"output": "png"}, "body": lambda fs: image_body(fs, "png"),
         "masks": lambda answer: [decode_png_answer(a) for a in answer]},
        {"name": "TIFF -> RLE", "frames": tiffs, "params": {"output": "rle"}, "body": lambda fs: image_body(fs, "rle"),
         "masks": lambda answer: [rle_decode(a, *shape) for a in answer]},
        {"name": "TIFF -> PNG, dataframe_split", "frames": tiffs, "params": {"output": "png"},
         "body": lambda fs: {"dataframe_split": {"columns": ["image"], "data": [[b64(f)] for f in fs]},
                             "params": {"output": "png"}},
         "masks": lambda answer: [decode_png_answer(a) for a in answer]},
    ]


def model_input(case: dict, items: list):
    import pandas as pd

    if "model_input" in case:
        return case["model_input"](items)
    return pd.DataFrame({"image": list(items)})


def timed(calls: dict, n: int, warmup: int = 2) -> dict[object, list[float]]:
    """ms per call of each callable, ``n`` rounds; each round calls every one once, so that a burst of
    load from elsewhere on the machine falls on all of them alike rather than on one form."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    out = {key: [] for key in calls}
    for _ in range(n):
        for key, fn in calls.items():
            began = time.perf_counter()
            fn()
            out[key].append(1000 * (time.perf_counter() - began))
    return out


def summary(ms: list[float]) -> dict:
    return {"median_ms": round(statistics.median(ms), 2), "p90_ms": round(float(np.percentile(ms, 90)), 2)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def model_server(uri: str, threads: int, timeout: float = 300):
    """``mlflow models serve`` on a free loopback port, in this environment; yields its base URL."""
    import requests

    port = free_port()
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log = tempfile.TemporaryFile()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager",
                               "local", "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        began = time.monotonic()
        while True:
            if server.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"the model server exited: {log.read().decode(errors='replace')[-3000:]}")
            try:
                if requests.get(f"{url}/ping", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() - began > timeout:
                raise RuntimeError(f"the model server did not answer /ping within {timeout:.0f} s")
            time.sleep(0.25)
        print(f"model server up on port {port} in {time.monotonic() - began:.1f} s", file=sys.stderr)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def parts(model, body: str) -> dict:
    """Each step of MLflow's scoring function for one request, in its order: the JSON request parsed
    (``_parse_json_data``: ``json.loads`` twice, then the data cast), the model (of which: its input
    decoded, the network with pre- and post-processing, the answer encoded), the JSON answer."""
    from io import StringIO

    from mlflow.pyfunc import scoring_server

    from pipeline import serving

    schema = model.metadata.get_input_schema()
    parsed = scoring_server._parse_json_data(body, model.metadata, schema)
    raw = model.predict(parsed.data, params=parsed.params)
    predictor = model.unwrap_python_model().predictor
    images = serving.image_values(parsed.data)
    output = serving.output_form(parsed.params, images is not None)
    if images is None:
        decode = lambda: serving.tensor_frames(parsed.data)  # noqa: E731
        network_input = decode()
    else:
        decode = lambda: [serving.decode_image(v, i) for i, v in enumerate(images)]  # noqa: E731
        network_input = np.stack(decode())
    masks = predictor.predict(network_input)
    return {
        "parse request": lambda: scoring_server._parse_json_data(body, model.metadata, schema),
        "model": lambda: model.predict(parsed.data, params=parsed.params),
        "model: decode input": decode,
        "model: network, pre/post-processing": lambda: predictor.predict(network_input),
        "model: encode answer": lambda: serving.answer(masks if images is None else list(masks), output),
        "JSON answer": lambda: scoring_server.predictions_to_json(raw, StringIO()),
    }


def measure(uri: str, frames: list[np.ndarray], tiffs: list[bytes], n: int, batch: int,
            threads: int) -> tuple[list[dict], dict]:
    import mlflow
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    model = mlflow.pyfunc.load_model(uri)
    schema = model.metadata.get_input_schema()
    reference = np.asarray(model.predict(np.stack(frames[:1])))
    rows, calls, all_cases = [], {}, []
    for case in cases(frames, tiffs):
        one = case["frames"][:1]
        body = json.dumps(case["body"](one))
        try:
            answer = json.loads(scoring_server.invocations(body, "application/json", model, schema).response)
        except MlflowException as error:  # a version registered before the compact form: its tensor form only
            print(f"{case['name']}: skipped, the model refuses it: {error.message.splitlines()[-1][:200]}",
                  file=sys.stderr)
            continue
        all_cases.append(case)
        masks = case["masks"](answer["predictions"])
        assert np.array_equal(np.asarray(masks), reference), f"{case['name']}: masks differ from the tensor form's"
        answer_text = json.dumps(answer)
        rows.append({"form": case["name"], "request_kb": round(len(body) / 1024, 1),
                     "answer_kb": round(len(answer_text) / 1024, 1)})
        # The client's side of a request: the frame in hand to the JSON body, the answer to masks.
        calls[case["name"], "client: build request"] = lambda one=one, case=case: json.dumps(case["body"](one))
        single = model_input(case, one)
        calls[case["name"], "in_process"] = lambda single=single, case=case: model.predict(
            single, params=case["params"])
        calls[case["name"], "scoring"] = lambda one=one, case=case: scoring_server.invocations(
            json.dumps(case["body"](one)), "application/json", model, schema)
        try:
            steps = parts(model, body)
        except (ImportError, AttributeError):  # the model's own code has no pipeline.serving to time it by
            steps = {}
        for step, fn in steps.items():
            calls[case["name"], step] = fn
        calls[case["name"], "client: read answer"] = lambda text=answer_text, case=case: case["masks"](
            json.loads(text)["predictions"])
    ms = timed(calls, n)
    for case, row in zip(all_cases, rows):
        row["in_process"] = summary(ms[case["name"], "in_process"])
        row["scoring"] = summary(ms[case["name"], "scoring"])
        row["parts_median_ms"] = {step: round(statistics.median(values), 2) for (name, step), values in ms.items()
                                  if name == case["name"] and step not in ("in_process", "scoring")}
    print("in process and scoring done", file=sys.stderr)
    compact_body = json.dumps(all_cases[-1]["body"](all_cases[-1]["frames"][:1]))
    with model_server(uri, threads) as url, requests.Session() as session:
        def call(case, items):
            response = session.post(f"{url}/invocations", data=json.dumps(case["body"](items)),
                                    headers={"Content-Type": "application/json"}, timeout=300)
            response.raise_for_status()
            return case["masks"](response.json()["predictions"])

        single = timed({**{c["name"]: lambda c=c: call(c, c["frames"][:1]) for c in all_cases},
                        # HTTP alone: the smallest round trip, and a compact body read then refused (415)
                        "ping": lambda: session.get(f"{url}/ping", timeout=60),
                        "body refused": lambda: session.post(f"{url}/invocations", data=compact_body, timeout=60,
                                                             headers={"Content-Type": "text/plain"})}, n)
        transport = {key: summary(single[key]) for key in ("ping", "body refused")}
        several = timed({c["name"]: lambda c=c: call(c, c["frames"][:batch]) for c in all_cases},
                        max(3, n // 10), warmup=1)
        for case, row in zip(all_cases, rows):
            row["http"] = summary(single[case["name"]])
            frames_per_request = len(case["frames"][:batch])
            row["http_batch"] = {"frames": frames_per_request, "frames_per_s": round(
                1000 * frames_per_request / statistics.median(several[case["name"]]), 1)}
    return rows, transport


def table(rows: list[dict]) -> str:
    lines = ["| form (one native frame) | request KB | answer KB | in process median | scoring median | "
             "HTTP median | HTTP p90 | HTTP, batch: frames/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['form']} | {r['request_kb']:.0f} | {r['answer_kb']:.0f} | "
                     f"{r['in_process']['median_ms']:.1f} ms | {r['scoring']['median_ms']:.1f} ms | "
                     f"{r['http']['median_ms']:.1f} ms | {r['http']['p90_ms']:.1f} ms | "
                     f"{r['http_batch']['frames_per_s']:.1f} ({r['http_batch']['frames']} frames) |")
    steps = list(max((r["parts_median_ms"] for r in rows), key=len))
    lines += ["", "where a request's time goes, median ms (rest: the HTTP median less the scoring median and the "
              "client's parts)", "",
              "| form | " + " | ".join(steps) + " | rest |", "|---" * (len(steps) + 2) + "|"]
    for r in rows:
        part = r["parts_median_ms"]
        client = part.get("client: build request", 0) + part.get("client: read answer", 0)
        rest = r["http"]["median_ms"] - r["scoring"]["median_ms"] - client
        lines.append(f"| {r['form']} | " + " | ".join(f"{part[s]:.1f}" if s in part else "-" for s in steps)
                     + f" | {rest:.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model URI (default: the champion of --project, else an untrained one)")
    parser.add_argument("--tracking-uri", help="the registry of --model (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--project", type=Path, help="a project folder: its registry (and its champion)")
    parser.add_argument("--untrained", choices=("params", "tiny"), default="params",
                        help="without --model/--project: register an untrained network of params.yaml, or a tiny one")
    parser.add_argument("--requests", type=int, default=30, help="timed requests per form and place")
    parser.add_argument("--batch", type=int, default=8, help="frames in the several-frames request")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads here and in the server (0: torch's default)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    import torch

    from pipeline.atomic import atomic_write_text

    if args.threads:
        torch.set_num_threads(args.threads)
    frames, tiffs = load_frames(max(args.batch, 2))
    load_before = os.getloadavg()[0]  # the figures mean little on a machine that others keep busy
    with tempfile.TemporaryDirectory(prefix="serve-http-") as tmp:
        if args.model or args.project:
            if args.tracking_uri:
                os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
            elif args.project and not os.environ.get("MLFLOW_TRACKING_URI"):
                from pipeline import registry

                os.environ["MLFLOW_TRACKING_URI"] = registry.tracking_uri(args.project / "mlflow")
            if args.model:
                uri = args.model
            else:
                from pipeline.config import load_params

                uri = f"models:/{load_params(args.project / 'params.yaml').registry.model_name}@champion"
            described = uri
        else:
            uri = register_untrained(args.untrained, Path(tmp), frames)
            described = f"untrained {'params.yaml' if args.untrained == 'params' else 'tiny'} network"
        rows, transport = measure(uri, frames, tiffs, args.requests, args.batch, args.threads)
    print(f"\nmodel: {described}; frames: {'real test TIFFs' if REAL.is_dir() else 'random'} 420x580; "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), torch threads "
          f"{torch.get_num_threads()}; {args.requests} requests per row; load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after\n")
    print(table(rows))
    print(f"\nHTTP alone, median: /ping {transport['ping']['median_ms']:.1f} ms; the last form's body read and refused "
          f"(415) {transport['body refused']['median_ms']:.1f} ms")
    result = {
        "command": "python bench/serve_http.py " + " ".join(
            a if not os.path.isabs(a) else Path(a).name for a in sys.argv[1:]),
        "model": described,
        "frames": "real test TIFFs" if REAL.is_dir() else "random",
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "requests": args.requests,
        "load_average": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "rows": rows,
        "http_alone": transport,
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
