"""The benchmarks in bench/ are run by hand, rarely and for long: a broken import or option found only
then costs an hour. Each script must import and build its command line; and a real-data benchmark
without the real frames must stop at once with exit code 2 and say what is missing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from pipeline.devices import cpu_has_native_bf16

from .conftest import REPO, tiny_model_config

BENCH = REPO / "bench"

# One interpreter for all scripts (torch is imported once): each one's main() runs with --help,
# which builds its parser and exits 0 before any work.
HELP_ALL = """
import contextlib, importlib.util, io, sys
failures = []
for path in sys.argv[1:]:
    spec = importlib.util.spec_from_file_location("bench_" + path.rsplit("/", 1)[-1][:-3], path)
    module = importlib.util.module_from_spec(spec)
    out = io.StringIO()  # fresh per script: an exit before main() must not see the last script's usage text
    try:
        spec.loader.exec_module(module)
        sys.argv = [path, "--help"]
        with contextlib.redirect_stdout(out):
            module.main()
        failures.append(f"{path}: main() returned without --help's exit")
    except SystemExit as stop:
        if stop.code not in (0, None) or "usage:" not in out.getvalue():
            failures.append(f"{path}: exited {stop.code!r} without printing its usage for --help")
    except Exception as error:
        failures.append(f"{path}: {type(error).__name__}: {error}")
print("\\n".join(failures))
sys.exit(1 if failures else 0)
"""


def test_every_benchmark_imports_and_builds_its_command_line():
    scripts = sorted(str(p) for p in BENCH.glob("**/*.py"))
    assert len(scripts) >= 18 and str(BENCH / "gpu" / "cuda_path.py") in scripts
    done = subprocess.run([sys.executable, "-c", HELP_ALL, *scripts], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr


def test_real_data_benchmark_without_the_frames_exits_2_and_says_why(tmp_path):
    # A copy of bench/ in a folder with no ../shared beside it: DATA resolves to a missing folder.
    copy = tmp_path / "checkout" / "bench"
    copy.mkdir(parents=True)
    for name in ("real_cv.py", "quantization_ceiling.py"):
        (copy / name).write_text((BENCH / name).read_text())
    done = subprocess.run([sys.executable, str(copy / "quantization_ceiling.py"), "--out", str(tmp_path / "q.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "kaggle-uns" in done.stderr and "not found" in done.stderr
    assert not (tmp_path / "q.json").exists()


def test_gpu_check_script_runs_its_steps_in_quick_mode(tmp_path):
    # CI has no GPU, and time on a GPU machine is scarce: the one script run there must not fail on its own
    # plumbing. QUICK=1 runs every step at tiny sizes, the CUDA-path checks on the CPU.
    done = subprocess.run(["bash", str(BENCH / "gpu" / "check.sh")], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "QUICK": "1", "PY": sys.executable, "OUT": str(tmp_path),
                                            "OMP_NUM_THREADS": "1"})
    summary = (tmp_path / "summary.txt").read_text()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for step in ("cuda_path", "train_throughput", "inference_speed"):
        assert f"{step}: exit 0" in summary
    assert "steps failed: 0" in summary
    checks = (tmp_path / "cuda_path.log").read_text()
    assert checks.count("PASS") == 4 and "resumes from the checkpoint" in checks
    throughput = (tmp_path / "train_throughput.log").read_text()
    assert "| plain fp32 eager (in memory) |" in throughput
    # params.yaml's instance norm on the CPU: bf16 (amp_cpu: auto) exactly where the CPU computes it natively
    precision = "bf16 autocast" if cpu_has_native_bf16() else "fp32"
    assert f"fit's step with these params here: {precision}, NCHW, eager" in throughput


def test_gpu_real_cv_script_links_the_carried_frames_and_keeps_to_its_deadline(tmp_path):
    # On the GPU machine ../shared does not exist: the script must link the carried .gpudata/ where
    # bench/real_cv.py looks, refuse plainly when nothing was carried, and start no run it cannot finish.
    checkout = tmp_path / "checkout"
    (checkout / "bench" / "gpu").mkdir(parents=True)
    script = checkout / "bench" / "gpu" / "real_cv.sh"
    script.write_text((BENCH / "gpu" / "real_cv.sh").read_text())
    (script.parent / "carried_wheels.sh").write_text((BENCH / "gpu" / "carried_wheels.sh").read_text())
    env = {**os.environ, "PY": sys.executable, "OUT": str(tmp_path / "out"), "DEADLINE": "0"}
    def run():
        return subprocess.run(["bash", str(script), "bench/real_cv_96_instance_norm.yaml"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60, env=env)

    missing = run()
    assert missing.returncode == 2 and "bench/gpu/real_cv.sh --stage" in missing.stdout
    assert not (tmp_path / "shared").exists()

    (checkout / ".gpudata" / "positives-256").mkdir(parents=True)
    late = run()
    link = tmp_path / "shared" / "datasets" / "kaggle-uns"
    assert link.is_symlink() and link.resolve() == (checkout / ".gpudata").resolve()
    assert late.returncode == 1
    assert "real_cv_96_instance_norm: not run" in (tmp_path / "out" / "summary.txt").read_text()
    assert not (tmp_path / "out" / "real_cv_96_instance_norm.log").exists()


def test_promotion_noise_judges_twins_from_any_dice_column_of_the_frame_files(tmp_path):
    """``bench/promotion_noise.py`` on two made-up runs of 2 folds x 6 subjects: ``FILE#dice_raw``
    picks the raw weights' column of a weight-averaged run; a column the file lacks stops it."""
    import json

    import numpy as np

    rng = np.random.default_rng(0)
    names = np.array([f"{s}_{n}" for s in range(1, 13) for n in range(1, 9)])
    folds = np.array([0 if int(n.split("_")[0]) <= 6 else 1 for n in names])
    for run in ("a", "b"):
        dice = rng.uniform(0.6, 0.9, len(names))
        np.savez(tmp_path / f"{run}.npz", name=names, fold=folds, dice=dice, dice_raw=dice - 0.05)
    out = tmp_path / "noise.json"
    done = subprocess.run([sys.executable, str(BENCH / "promotion_noise.py"), "--twins",
                           f"{tmp_path / 'a.npz'}#dice_raw,{tmp_path / 'b.npz'}#dice_raw", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 6 and {r["challenger"] for r in rows} == {"a.npz#dice_raw", "b.npz#dice_raw"}
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    pooled = next(r for r in rows if r["fold"] == "all" and r["challenger"] == "a.npz#dice_raw")
    assert pooled["difference"] == round(float((a["dice_raw"] - b["dice_raw"]).mean()), 4)
    missing = subprocess.run([sys.executable, str(BENCH / "promotion_noise.py"), "--twins",
                              f"{tmp_path / 'a.npz'}#dice_tta,{tmp_path / 'b.npz'}", "--out", str(out)],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "no column 'dice_tta'" in missing.stderr


def test_phantom_seeds_trains_each_norm_and_seed_and_reports_each_holdout_subjects_empty_frames(tmp_path, capsys,
                                                                                                monkeypatch):
    """``bench/phantom_seeds.py`` on a 6-subject phantom, one epoch per run: one row per (norm, seed)
    with the settings it says, and the holdout subjects' empty-frame presence in every row. Its ``main``
    runs in this process (its imports cost more than its runs), with the command line it would be given."""
    import importlib.util
    import json

    import torch

    out = tmp_path / "seeds.json"
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["augment"]["elastic_p"] = 0.55  # --params is honoured, and the result records what ran
    params["promotion"]["min_nerve_dice"] = 0.99  # out of one epoch's reach: every run must be refused
    # the script's plumbing, not the recipe's size: a tiny network at a tiny working size, two overlays
    params["preprocess"].update(height=32, width=48)
    params["model"].update(depth=2, base_width=8)
    params["evaluate"]["overlays"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    spec = importlib.util.spec_from_file_location("bench_phantom_seeds", BENCH / "phantom_seeds.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts the repository and bench/ first
    threads = torch.get_num_threads()
    try:
        spec.loader.exec_module(script)
        code = script.main(["--seeds", "3,5", "--norms", "batch,instance", "--epochs", "1", "--threads", "1",
                            "--subjects", "6", "--frames-per-subject", "8", "--amp-cpu", "false",
                            "--params", str(tmp_path / "params.yaml"), "--keep", str(tmp_path / "work"), "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # --threads 1 set this process's torch threads
    printed = capsys.readouterr().out
    assert code == 0, printed
    result = json.loads(out.read_text())
    assert result["augment"] == params["train"]["augment"]
    runs = result["runs"]
    assert [(r["norm"], r["seed"]) for r in runs] == [("batch", 3), ("batch", 5), ("instance", 3), ("instance", 5)]
    assert all(r["empty_presence_median"] and 0 <= r["dice"] <= 1 for r in runs)
    assert all(r["floor"] == "refused" and "promotion.min_nerve_dice 0.99" in r["floor_reason"] for r in runs)
    assert all(0 < r["empty_baseline_dice"] < 1 for r in runs)
    assert result["train_overrides"]["amp_cpu"] is False and all(r["precision"] == "fp32" for r in runs)
    config = json.loads((tmp_path / "work" / "instance-5" / "models" / "model_config.json").read_text())
    assert config["norm"] == "instance"
    assert "| instance | 2 |" in printed  # the summary row


def test_promotion_floor_replays_recorded_phantom_runs_through_the_gates_floor(tmp_path):
    """``bench/promotion_floor.py`` on a made-up phantom_seeds file: the no-nerve baseline comes from the
    regenerated phantom's holdout subjects; a blind run, a false-alarm collapse and a healthy run."""
    import json

    from pipeline.phantom import PhantomSpec, generate_phantom

    spec = {"subjects": 4, "frames_per_subject": 6, "seed": 11}
    table = generate_phantom(tmp_path / "phantom", PhantomSpec(**spec))
    held = table[table.subject.isin([1, 2])]
    baseline = float((~held.has_nerve).mean())
    assert 0 < baseline < 1

    def run(seed, dice, nerve):
        return {"norm": "instance", "seed": seed, "dice": dice, "dice_nerve_frames": nerve, "false_alarms": 0,
                "empty_presence_median": {"2": 0.1, "1": 0.0}}

    runs = [run(0, baseline, 0.0), run(1, baseline - 0.05, 0.8), {**run(2, baseline + 0.2, 0.8), "precision": "bf16"}]
    (tmp_path / "seeds.json").write_text(json.dumps({"phantom": spec, "runs": runs}))
    out = tmp_path / "floor.json"
    done = subprocess.run([sys.executable, str(BENCH / "promotion_floor.py"), str(tmp_path / "seeds.json"),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(out.read_text())["runs"]
    assert [r["floor"] for r in rows] == ["refused", "refused", "clears"]
    assert rows[0]["empty_baseline"] == round(baseline, 4) and rows[0]["holdout_frames"] == len(held)
    assert "min_nerve_dice" in rows[0]["reason"] and "predicting no nerve" in rows[1]["reason"]
    assert "2 of 3 runs refused" in done.stdout
    assert "| seeds | instance, bf16 | 2 |" in done.stdout and "| seeds | instance | 0 |" in done.stdout


def test_every_real_cv_settings_file_resolves_to_valid_params():
    """A settings file is only read when its 30-60 minute benchmark starts: each ``bench/real_cv*.yaml``
    must resolve (through its ``base:`` chain) into ``Params``, which rejects unknown keys, and a variant
    must keep its base's settings while changing what it says it changes."""
    import json

    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_real_cv", BENCH / "real_cv.py")
    real_cv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(real_cv)
    files = sorted(str(f.relative_to(REPO)) for f in BENCH.glob("real_cv*.yaml"))
    assert len(files) >= 12
    resolved = {}
    for path in files:  # the benchmark's own loader, in this process
        p = real_cv.load_settings(str(REPO / path))
        resolved[path.rsplit("/", 1)[-1]] = {
            "size": [p.preprocess.height, p.preprocess.width], "depth": p.model.depth, "ema_decay": p.train.ema_decay,
            "amp_cpu": p.train.amp_cpu, "epochs": p.train.epochs, "deep_supervision": p.model.deep_supervision,
            "upsample": p.model.upsample, "norm": p.model.norm, "augment": p.train.augment.model_dump(mode="json")}
    # what JSON makes of them, as when this ran in a script of its own (tuples become lists)
    resolved = json.loads(json.dumps(resolved))
    assert set(resolved) == {f.rsplit("/", 1)[-1] for f in files}
    # Every recorded recipe says what it trained in, not params.yaml's machine-dependent "auto".
    assert all(r["amp_cpu"] in (True, False) for r in resolved.values()), resolved
    plain = {k: v for k, v in resolved["real_cv.yaml"].items() if k != "augment"}
    assert plain == {"size": [64, 88], "depth": 3, "ema_decay": 0.0, "amp_cpu": False, "epochs": 12,
                     "deep_supervision": 0, "upsample": "transpose", "norm": "batch"}
    assert resolved["real_cv_ema.yaml"] == {**resolved["real_cv.yaml"], "ema_decay": 0.998}
    assert resolved["real_cv_96_ema.yaml"] == {**resolved["real_cv_96.yaml"], "ema_decay": 0.998}
    assert resolved["real_cv_96_ema.yaml"]["depth"] == 4 and resolved["real_cv_96_ema.yaml"]["amp_cpu"] is True
    assert resolved["real_cv_128_ema.yaml"] == {**resolved["real_cv_96_ema.yaml"], "size": [128, 176]}
    # A partial ``model:`` in a variant merges into its base's, keeping the other network keys.
    assert resolved["real_cv_96_ds.yaml"] == {**resolved["real_cv_96.yaml"], "deep_supervision": 2}
    # The default size's long+strong recipe repeats the augmentation of the 64x88 one (a base: chain has one
    # parent): the copy must stay the same.
    long_strong = resolved["real_cv_long_strong.yaml"]
    assert long_strong["augment"] != resolved["real_cv.yaml"]["augment"]
    assert resolved["real_cv_96_instance_long_strong.yaml"] == {
        **resolved["real_cv_96.yaml"], "norm": "instance", "epochs": long_strong["epochs"], "augment": long_strong["augment"]}


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_inference_speed_rows_time_the_paths_their_names_say(norm):
    """Each row of ``bench/inference_speed.py`` is judged by its network's state, not by its options:
    a row once timed channels-last while named NCHW because ``Predictor``'s default changed under it."""
    import importlib.util

    import torch

    from pipeline.inference import Postprocess
    from pipeline.model import build_model

    spec = importlib.util.spec_from_file_location("bench_inference_speed", BENCH / "inference_speed.py")
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    config = tiny_model_config(norm)
    rows = speed.cpu_paths(build_model(config), config, Postprocess(), compile_too=False)
    assert list(rows) == ["eager fp32, NCHW", "BatchNorm folded, NCHW", "BatchNorm folded + channels-last"]
    for name, predictor in rows.items():
        conv = next(m for m in predictor.model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) == ("channels-last" in name), name
        has_batch_norm = any(isinstance(m, torch.nn.BatchNorm2d) for m in predictor.model.modules())
        assert has_batch_norm == (norm == "batch" and name.startswith("eager")), name
