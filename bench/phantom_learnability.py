"""How hard is the phantom for the project's own model? Holdout Dice after a short training.

Generates a phantom (default: the quickstart spec of params.yaml, 12 subjects x 30 frames,
seed 2016) into a temporary folder and runs the pipeline's own stages on it, exactly as the
quickstart flow does: ``preprocess`` (resize, split by subject), ``train`` (the U-Net with its
presence head, every setting from ``params.yaml``), ``evaluate`` (thresholds tuned on the
validation subjects, holdout scored at native resolution). Training is one ``train`` call with
early stopping as in the flow; when a time budget (``--minutes``) would be overrun it is stopped
after an epoch and resumed by ``train`` for one last epoch; the best epoch's weights are evaluated
as usual. With ``--chunked --keep DIR`` it stops there instead, and the same command with
``--resume`` continues from ``train``'s checkpoint (the settings are kept in DIR), so a full
training can be spread over calls of a few minutes each on a busy machine; ``--resume`` on a
finished training only evaluates. ``--threads 1`` is faster than torch's default on a loaded
2-core machine.

Reports holdout Dice over all frames (the competition's figure: 1 on an empty frame predicted
empty), Dice on the nerve frames only, presence accuracy, and the score of predicting every frame
empty, for reference. Real data gives 0.6-0.75 with such models; a phantom that scores 0.95 is
too easy to mean much, one that scores the all-empty figure is not learnable.
Writes the result into ``docs/phantom.md`` between the ``learnability`` markers with ``--write``.

    nice -n 10 python bench/phantom_learnability.py [--subjects 12] [--frames-per-subject 30]
        [--seed 2016] [--hard] [--minutes 6] [--epochs N] [--threads N]
        [--keep DIR [--chunked] [--resume]] [--write]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from pipeline.config import load_params  # noqa: E402
from pipeline.evaluate import evaluate  # noqa: E402
from pipeline.phantom import PhantomSpec, generate_phantom  # noqa: E402
from pipeline.preprocess import FRAMES, preprocess  # noqa: E402
from pipeline.train import CHECKPOINT, train  # noqa: E402


class _OutOfTime(Exception):
    pass


def train_with_budget(prepared: Path, models: Path, params, budget_s: float, chunked: bool = False, log=print):
    """Run ``train`` as the flow does; when the next epochs would overrun the budget, stop it
    after an epoch (its checkpoint is saved) and let ``train`` resume for one last epoch, which
    writes its outputs. With ``chunked``, stop there instead and return None: a later call resumes
    from the checkpoint. Returns (epochs run, best epoch, best validation Dice, seconds, finished)."""
    began = time.perf_counter()
    done = []  # epochs run by this call (a resumed call starts mid-way)

    def on_epoch(epoch: int, row: dict) -> None:
        spent = time.perf_counter() - began
        done.append(epoch)
        log(f"  epoch {epoch:3d}  loss {row['loss']:.3f}  val Dice {row['val_dice']:.3f}  "
            f"val presence {row['val_presence_accuracy']:.2f}  ({spent:.0f} s)")
        if epoch < params.train.epochs and spent + 2 * spent / len(done) > budget_s:
            # Not when this epoch ended the training anyway (early stopping): let train finish.
            if not torch.load(models / CHECKPOINT, map_location="cpu", weights_only=True)["finished"]:
                raise _OutOfTime

    try:
        result = train(prepared, models, params, on_epoch=on_epoch, progress=False)
        finished = True
    except _OutOfTime:
        if chunked:
            return None
        result = train(prepared, models, params, on_epoch=lambda e, r: log(f"  epoch {e:3d}  val Dice "
                       f"{r['val_dice']:.3f} (last, budget spent)"), progress=False, max_epochs_this_call=1)
        state = torch.load(models / CHECKPOINT, map_location="cpu", weights_only=True)
        finished = bool(state["finished"])
    return result.epochs_run, result.best_epoch, result.best_val_dice, time.perf_counter() - began, finished


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", type=int, default=None, help="default: params.yaml data.synth")
    ap.add_argument("--frames-per-subject", type=int, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--hard", action="store_true", help="the harder phantom (PhantomSpec.hard)")
    ap.add_argument("--minutes", type=float, default=6.0, help="training time budget")
    ap.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    ap.add_argument("--threads", type=int, default=None,
                    help="override train.threads (1 is faster than 2 on a loaded 2-core machine)")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--keep", type=Path, default=None, help="work here and keep the files")
    ap.add_argument("--chunked", action="store_true",
                    help="with --keep: when --minutes is spent, stop after an epoch without evaluating; "
                         "run again with --resume to continue (train resumes from its checkpoint)")
    ap.add_argument("--resume", action="store_true", help="with --keep: reuse its phantom and checkpoint")
    ap.add_argument("--write", action="store_true", help="write the result into docs/phantom.md")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    synth = params.data.synth
    spec = PhantomSpec(args.subjects or synth.subjects, args.frames_per_subject or synth.frames_per_subject,
                       synth.seed if args.seed is None else args.seed, hard=args.hard)
    overrides = {k: v for k, v in (("epochs", args.epochs), ("threads", args.threads)) if v is not None}
    if overrides:
        params = params.model_copy(update={"train": params.train.model_copy(update=overrides)})
    if (args.chunked or args.resume) and not args.keep:
        ap.error("--chunked and --resume need --keep DIR")
    work = args.keep or Path(tempfile.mkdtemp(prefix="learnability-"))
    raw, prepared, models, reports = work / "raw", work / "prepared", work / "models", work / "reports"
    ledger = work / "training_seconds.json"  # training time summed over the chunks
    if args.resume and not (prepared / FRAMES).is_file():
        ap.error(f"--resume: nothing to resume in {work}")
    if args.keep and work.exists() and not args.resume:
        shutil.rmtree(work)
    # The settings travel with the work folder: a resumed run keeps them even if params.yaml
    # changed meanwhile (train would otherwise refuse the checkpoint and start over).
    snapshot = work / "params.yaml"
    if args.resume:
        params = load_params(snapshot)
    else:
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        snapshot.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    t0 = time.perf_counter()
    try:
        if not args.resume:
            generate_phantom(raw, spec)
            preprocess(raw, prepared, params, progress=False)
            ledger.parent.mkdir(parents=True, exist_ok=True)
            ledger.write_text(json.dumps({"seconds": 0.0, "chunks": 0}))
        frames = pd.read_csv(prepared / FRAMES)
        hold = frames[frames.split == "holdout"]
        print(f"phantom {spec.subjects}x{spec.frames_per_subject} seed {spec.seed}{' hard' if spec.hard else ''}: "
              f"{len(frames)} frames ({time.perf_counter() - t0:.0f} s); holdout subjects "
              f"{sorted(int(s) for s in hold.subject.unique())}, {len(hold)} frames, {(~hold.has_nerve).mean():.0%} empty")
        began = time.perf_counter()
        state = (torch.load(models / CHECKPOINT, map_location="cpu", weights_only=True)
                 if args.resume and (models / CHECKPOINT).is_file() else None)
        if state is not None and state["finished"]:  # trained already: evaluate and report only
            outcome = (state["epoch"], state["best_epoch"], round(state["best"], 6), 0.0, True)
        else:
            outcome = train_with_budget(prepared, models, params, args.minutes * 60, chunked=args.chunked)
        if args.keep:
            spent = json.loads(ledger.read_text())
            if not (state is not None and state["finished"]):  # this call trained
                spent = {"seconds": spent["seconds"] + time.perf_counter() - began, "chunks": spent["chunks"] + 1}
                ledger.write_text(json.dumps(spent))
        if outcome is None:
            print(f"time budget spent; continue with the same command plus --resume (work folder {work})")
            return 3
        epochs, best_epoch, best_val, t_train, finished = outcome
        if args.keep:
            t_train, chunks = spent["seconds"], spent["chunks"]
        else:
            chunks = 1
        result = evaluate(raw, prepared, models, reports, params)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    m = result.metrics
    all_empty = float((~hold.has_nerve).mean())
    rows = [
        ("holdout Dice, all frames", f"{m['dice']:.3f}"),
        ("holdout Dice, nerve frames", f"{m['dice_nerve_frames']:.3f}"),
        ("holdout presence accuracy", f"{m['presence_accuracy']:.3f}"),
        ("holdout Dice of predicting every frame empty", f"{all_empty:.3f}"),
        ("best validation Dice (epoch)", f"{best_val:.3f} ({best_epoch})"),
        ("epochs run / of", f"{epochs} / {params.train.epochs}" + ("" if finished else " (time budget)")),
        ("training seconds (calls)", f"{t_train:.0f} ({chunks})"),
        ("post-processing tuned on validation", f"mask {result.postprocess.mask_threshold}, presence "
         f"{result.postprocess.presence_threshold}, min area {result.postprocess.min_area}"),
    ]
    text = "\n".join(["| figure | value |", "| --- | --- |", *[f"| {a} | {b} |" for a, b in rows]])
    print(text)
    if args.write:
        from phantom_vs_real import machine, replace_section
        from real_cv import repo_relative

        given = list(argv if argv is not None else sys.argv[1:])
        before = ["", *given]
        shown = [("DIR" if before[i] == "--keep" else repo_relative(a) if before[i] == "--params" else a)
                 for i, a in enumerate(given) if a not in ("--resume", "--write")]
        cmd = f"`nice -n 10 python bench/phantom_learnability.py {' '.join(shown)} --write`"
        if args.keep:
            cmd += (" (in calls of at most --minutes each, repeated with `--resume` until training finished; "
                    "`--resume` on a finished training only evaluates)")
        body = (f"Produced by {cmd} on {time.strftime('%Y-%m-%d', time.gmtime())}, {machine()}, "
                f"torch {torch.__version__} on the CPU (other jobs were running on the machine), phantom "
                f"{spec.subjects} x {spec.frames_per_subject} (seed {spec.seed}{', hard' if spec.hard else ''}), "
                f"model/train/preprocess/postprocess settings of `params.yaml`"
                f"{' except ' + ', '.join(f'train.{k} = {v}' for k, v in overrides.items()) if overrides else ''}, "
                f"split by subject (holdout subjects {sorted(int(s) for s in hold.subject.unique())}, "
                f"{len(hold)} frames).\n\n{text}")
        replace_section(ROOT / "docs" / "phantom.md", "learnability" + ("-hard" if args.hard else ""), body)
        print(f"wrote the table into {ROOT / 'docs' / 'phantom.md'}")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
