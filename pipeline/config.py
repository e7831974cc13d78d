"""Typed settings read once from ``params.yaml``.

Every stage receives a :class:`Params` object; nothing reads the YAML file again.
Unknown keys are errors, so a typo in ``params.yaml`` cannot silently fall back
to a default. The defaults below are the repository's ``params.yaml`` (a test keeps them
equal), so a key left out of an operator's file means the documented recipe, not another one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SynthParams(_Section):
    subjects: int = Field(12, ge=3)
    frames_per_subject: int = Field(30, ge=1)
    seed: int = 2016


class DataParams(_Section):
    raw_dir: str = "data/raw"
    synth: SynthParams = SynthParams()


class ValidationParams(_Section):
    frame_height: int = 420
    frame_width: int = 580
    mask_area_min: int = Field(1500, ge=0)
    mask_area_max: int = Field(30000, ge=1)
    blank_std_max: float = 2.0
    saturated_mean_min: float = 250.0
    min_frames: int = Field(10, ge=1)
    min_subjects: int = Field(3, ge=1)
    # Near-duplicate frames of one subject: perceptual hashes (256 bits) at most this far apart.
    near_duplicate_max_bits: int = Field(6, ge=0, le=256)
    # Two near-duplicates whose non-empty masks overlap less than this (Dice) contradict.
    near_duplicate_dice_min: float = Field(0.5, ge=0, le=1)
    # Drift against the previous data version: warn when a figure moves more than this.
    drift_intensity_mean: float = Field(10.0, ge=0)  # grey levels, mean of frame means
    drift_intensity_std: float = Field(5.0, ge=0)  # grey levels, mean of frame spreads
    drift_empty_share: float = Field(0.10, ge=0, le=1)  # absolute change of the empty share
    drift_mask_area: float = Field(0.20, ge=0)  # relative change of the median non-empty area
    # Checks whose failure only warns (the others block the flow); names in docs/validation.md.
    warning_checks: tuple[str, ...] = ("contradicting_duplicates", "drift")

    CHECKS: ClassVar[tuple[str, ...]] = (
        "row_count", "subject_count", "names", "unique_ids", "mask_for_frame", "frame_for_mask",
        "frame_decodes", "mask_decodes", "frame_height", "frame_width", "frame_channels",
        "frame_dtype", "mask_height", "mask_width", "mask_channels", "mask_binary", "mask_area",
        "not_blank", "not_saturated", "contradicting_duplicates", "drift",
    )

    @field_validator("warning_checks")
    @classmethod
    def _known_checks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [v for v in value if v not in cls.CHECKS]
        if unknown:
            raise ValueError(f"unknown check(s) {unknown}; known: {', '.join(cls.CHECKS)}")
        return tuple(value)

    def severity(self, check: str) -> str:
        """``"warning"`` for a check listed in ``warning_checks``, else ``"blocking"``."""
        return "warning" if check in self.warning_checks else "blocking"


class PreprocessParams(_Section):
    out_dir: str = "data/prepared"
    height: int = Field(96, ge=16)
    width: int = Field(128, ge=16)


class SplitParams(_Section):
    seed: int = 42
    validation_fraction: float = Field(0.17, gt=0, lt=1)  # used when folds == 1
    holdout_fraction: float = Field(0.25, gt=0, lt=1)
    # Subject-grouped k-fold cross-validation of the non-holdout subjects: with folds = k > 1,
    # fold i validates on the i-th group of subjects and trains on the others. The flow trains
    # one fold (``fold``); ``nerveseg cv`` trains all of them.
    folds: int = Field(1, ge=1)
    fold: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _fold_in_range(self) -> "SplitParams":
        if self.fold >= self.folds:
            raise ValueError(f"split.fold is {self.fold} but must be below split.folds ({self.folds})")
        return self


class ModelParams(_Section):
    depth: int = Field(4, ge=1, le=6)
    base_width: int = Field(16, ge=2)
    dropout: float = Field(0.1, ge=0, lt=1)
    norm: Literal["batch", "instance", "group", "none"] = "instance"
    residual: bool = False
    upsample: Literal["transpose", "resize"] = "transpose"
    deep_supervision: int = Field(0, ge=0)  # coarser decoder levels with their own mask head in the loss; 0 = off

    @model_validator(mode="after")
    def _deep_supervision_in_range(self) -> "ModelParams":
        # Checked here too (the network checks again) so a bad value fails when params.yaml is read,
        # not after the flow has validated and preprocessed the data.
        if self.deep_supervision >= self.depth:
            raise ValueError(f"model.deep_supervision is {self.deep_supervision} but must be below model.depth "
                             f"({self.depth}): the decoder has {self.depth - 1} levels below the output")
        return self


class LossParams(_Section):
    dice_weight: float = Field(1.0, ge=0)
    bce_weight: float = Field(1.0, ge=0)
    presence_weight: float = Field(0.5, ge=0)
    lovasz_weight: float = Field(0.0, ge=0)  # Lovász hinge on the mask (per-frame IoU surrogate); 0 = off


class AugmentParams(_Section):
    """Each transform with its probability; frame and mask get the same geometry."""

    hflip_p: float = Field(0.5, ge=0, le=1)
    affine_p: float = Field(0.8, ge=0, le=1)  # shift, scale, rotate and shear together
    shift_limit: float = Field(0.1, ge=0)
    scale_limit: float = Field(0.2, ge=0)
    rotate_limit: float = Field(15, ge=0)
    shear_limit: float = Field(8, ge=0)  # degrees
    elastic_p: float = Field(0.3, ge=0, le=1)
    grid_distortion_p: float = Field(0.3, ge=0, le=1)
    brightness_contrast_p: float = Field(0.5, ge=0, le=1)
    brightness_limit: float = Field(0.15, ge=0)
    contrast_limit: float = Field(0.15, ge=0)
    gamma_p: float = Field(0.3, ge=0, le=1)
    gamma_limit: tuple[int, int] = (80, 120)  # percent
    speckle_p: float = Field(0.3, ge=0, le=1)  # multiplicative noise, like speckle
    speckle_limit: float = Field(0.1, ge=0, lt=1)


class TrainParams(_Section):
    out_dir: str = "models"
    seed: int = 0
    epochs: int = Field(24, ge=1)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(0.003, ge=0)
    weight_decay: float = Field(0.0001, ge=0)
    early_stopping_patience: int = Field(0, ge=0)  # 0 = off: the cosine schedule runs to its end
    min_epochs: int = Field(12, ge=1)  # early stopping only from this epoch on
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    # bf16 autocast on the CPU too. "auto": where the CPU computes bf16 natively (AVX512-BF16, AMX),
    # fp32 elsewhere without a word; true: the same, but warns on a CPU without it; false: fp32.
    amp_cpu: Literal["auto"] | bool = "auto"
    threads: int = Field(0, ge=0)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: int = Field(1, ge=0)
    # NHWC tensors and weights; "auto": where the normalisation runs faster in NHWC (batch, none;
    # pipeline.model.CHANNELS_LAST_NORMS, measured on the CPU), true/false force it.
    channels_last: Literal["auto"] | bool = "auto"
    compile: bool = False       # torch.compile the network (measured in docs/benchmarks.md)
    # inductor generates fused kernels (minutes of compiling on a CPU); aot_eager only traces,
    # which checks that the network compiles without the wait.
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    loader_workers: int = Field(0, ge=0)  # data-loader processes; 0 loads in the training process
    # >1: the flow's train task launches the stage under torchrun on this machine (gloo on the CPU, NCCL
    # with one process per GPU); batch_size stays the global batch, split across the processes
    processes: int = Field(1, ge=1, le=64)
    # Train every fold of split.folds and register the mean of the fold models as one model
    # (split.folds times the training and inference time; pipeline/ensemble.py).
    ensemble_folds: bool = False
    # Train on each working-size pixel's mask coverage (0-1) instead of the 0/1 mask: keeps the
    # native outline that the small working grid would round off (docs/model.md, benchmarks.md).
    soft_targets: bool = False
    # Validate, checkpoint and ship an exponential moving average of the weights (this decay per
    # optimiser step; 0 = off, the raw weights). pipeline/weight_average.py, docs/benchmarks.md.
    ema_decay: float = Field(0.0, ge=0, lt=1)
    loss: LossParams = LossParams()
    augment: AugmentParams = AugmentParams()


class PostprocessParams(_Section):
    tune: bool = True
    mask_threshold: float = Field(0.5, gt=0, lt=1)
    presence_threshold: float = Field(0.5, ge=0, le=1)
    min_area: int = Field(0, ge=0)
    largest_component: bool = False  # keep only the largest predicted blob
    tta_hflip: bool = False          # test-time augmentation: mean over the frame and its mirror
    convex_hull: bool = False        # fill each predicted blob out to its convex hull


class EvaluateParams(_Section):
    out_dir: str = "reports"
    overlays: int = Field(8, ge=0)


class RegistryParams(_Section):
    model_name: str = "nerve-segmentation"
    experiment: str = "nerve-segmentation"


class PromotionParams(_Section):
    """The gate: a paired bootstrap of per-frame Dice differences on the same holdout frames."""

    margin: float = 0.0               # the interval's lower bound must exceed this
    bootstrap_resamples: int = Field(2000, ge=100)
    # What the bootstrap draws: "frame", or "subject" (whole subjects with all their frames). A
    # subject's frames are near-duplicates of one video, so resampling frames overstates the evidence
    # (on real data its intervals are about 1.5x too narrow: docs/benchmarks.md, "The promotion gate on real data").
    resample: Literal["frame", "subject"] = "frame"
    min_subjects: int = Field(5, ge=2)  # resample: subject promotes nothing on a holdout of fewer subjects
    # The gate scores both models only on current holdout subjects that neither trained or validated on
    # (each version's recorded split); with fewer such subjects than this it promotes nothing.
    min_comparison_subjects: int = Field(3, ge=1)
    confidence: float = Field(0.95, gt=0.5, lt=1)
    presence_tolerance: float = Field(0.02, ge=0, le=1)  # allowed drop in presence accuracy
    # The floor for any promotion, the first included (pipeline/promotion.py): Dice on the holdout's
    # nerve frames (0 switches it off), and the holdout Dice's gain over predicting "no nerve" on every
    # frame (-1 switches it off). Healthy models: 0.75-0.88 on nerve frames, phantom and real.
    min_nerve_dice: float = Field(0.5, ge=0, le=1)
    min_gain_over_empty: float = Field(0.0, ge=-1, le=1)
    seed: int = 0
    # Hold a promotion that passed the gate for a person's approve/reject (nerveseg approve/reject);
    # no answer within approval_timeout_s seconds means no promotion.
    require_approval: bool = False
    approval_timeout_s: int = Field(3600, ge=1)


class NotifyParams(_Section):
    """How failure notices are POSTed besides the Prefect artifact and log. The webhook itself is a
    credential (chat webhooks carry their token in the URL): ``NERVESEG_WEBHOOK_URL`` or the file
    ``NERVESEG_WEBHOOK_URL_FILE`` names, never this file, which is committed and copied into run records."""

    timeout_s: float = Field(5.0, gt=0, le=60)

    @model_validator(mode="before")
    @classmethod
    def _no_webhook_here(cls, values):
        if isinstance(values, dict) and "webhook_url" in values:
            if values.get("webhook_url"):
                raise ValueError("webhook_url does not belong in params.yaml: a webhook URL carries its token, and "
                                 "params.yaml is committed and recorded with every run. Remove the line and set "
                                 "NERVESEG_WEBHOOK_URL, or NERVESEG_WEBHOOK_URL_FILE naming a file only you can read")
            values = {k: v for k, v in values.items() if k != "webhook_url"}  # an empty one, as before: harmless
        return values


class RunnerParams(_Section):
    """How the per-file work of validation and preprocessing runs: a thread pool in the flow's
    process (default) or Prefect's Dask task runner on a local or an existing Dask cluster."""

    kind: Literal["thread", "dask"] = "thread"
    dask_address: str = ""      # e.g. tcp://10.0.0.5:8786; empty: a local cluster of `workers`
    workers: int = Field(2, ge=1)


class Params(_Section):
    data: DataParams = DataParams()
    validation: ValidationParams = ValidationParams()
    preprocess: PreprocessParams = PreprocessParams()
    split: SplitParams = SplitParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    postprocess: PostprocessParams = PostprocessParams()
    evaluate: EvaluateParams = EvaluateParams()
    registry: RegistryParams = RegistryParams()
    promotion: PromotionParams = PromotionParams()
    notify: NotifyParams = NotifyParams()
    runner: RunnerParams = RunnerParams()

    # Operational settings that change neither the data, the model nor the gate: left out of the
    # digest, so changing them does not make the next run retrain (and digests stay comparable).
    OPERATIONAL: ClassVar[dict[str, tuple[str, ...] | None]] = {
        "notify": None, "runner": None, "promotion": ("require_approval", "approval_timeout_s"),
    }

    def digest(self) -> str:
        """A stable hash of every setting that shapes the model and its gate: two runs with the same
        digest used the same numbers (operational settings, see ``OPERATIONAL``, are left out)."""
        settings = self.model_dump(mode="json")
        for section, keys in self.OPERATIONAL.items():
            if keys is None:
                settings.pop(section, None)
            else:
                for key in keys:
                    settings.get(section, {}).pop(key, None)
        canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class ParamsError(ValueError):
    """``params.yaml`` is missing, unreadable or breaks a rule."""


def read_yaml_mapping(path: Path, error: type[Exception]) -> dict:
    """A YAML file that must hold a mapping; ``error`` names the file and what is wrong with it."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a mapping of settings at the top level")
    return raw


def load_params(path: Path | str) -> Params:
    """Read and check ``params.yaml``; raise :class:`ParamsError` naming the file and the bad key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: no such file; run from the project folder or pass --params")
    raw = read_yaml_mapping(path, ParamsError)
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ParamsError(f"{path}: {problems}. Fix these keys in {path.name}.") from exc


def write_params(params: Params, path: Path | str) -> None:
    """Write settings back as YAML (used by tests and tools that derive a variant)."""
    from pipeline.atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
