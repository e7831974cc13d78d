"""The checks, one declaration each: name, column, which rows, rule, message.

Everything else reads this table: :mod:`pipeline.validation.suite` builds the GX suite from it (each
expectation carries its check's name in ``meta.check``, so a result maps back by name, never by
position), :mod:`pipeline.validation.report` takes each failure's message from it, and
``ValidationParams.warning_checks`` names its entries to make them warn instead of block.

A rule is a function of :class:`~pipeline.config.ValidationParams` returning the expectation's
arguments, so the thresholds come from ``params.yaml``; a message is a ``str.format`` template over the
same fields. ``expectation`` is the GX Core class (``great_expectations.expectations``); a check that
GX Core cannot express (drift compares two data versions) has none and is computed by the project.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.config import ValidationParams

Rule = Callable[["ValidationParams"], dict[str, Any]]

# Which rows a check looks at. Per-file checks skip rows whose name breaks the layout, decode checks
# skip files that are missing, and figures are null where a file does not decode (GX skips nulls):
# so each defect is reported once, by the check that describes it.
ROWS = {
    "named": (("name_ok", "==", True),),
    "frames": (("name_ok", "==", True), ("image_exists", "==", True)),
    "masks": (("name_ok", "==", True), ("mask_exists", "==", True)),
    "nonempty_masks": (("name_ok", "==", True), ("mask_area", ">", 0)),
}


@dataclass(frozen=True)
class Check:
    name: str  # as in params.yaml ``validation.warning_checks`` and the failure list's ``check``
    message: str  # plain words, a template over ValidationParams' fields
    expectation: str | None = None  # GX expectation class; None: computed by the project
    column: str | None = None
    rule: Rule | None = None  # the expectation's arguments (bounds, value set) from the thresholds
    rows: str | None = None  # a key of ROWS; None: every row
    files: str | None = None  # the manifest column naming the file a failing row reports

    def describe(self, rules: ValidationParams) -> str:
        return self.message.format(**rules.model_dump())

    def arguments(self, rules: ValidationParams) -> dict[str, Any]:
        return {**(self.rule(rules) if self.rule else {}), **({"column": self.column} if self.column else {})}


def _true(rules: ValidationParams) -> dict:
    return {"value_set": [True]}


def _exactly(value: str | int) -> Rule:
    """Both bounds at ``value``: the name of a ValidationParams field, or a number."""
    def rule(rules: ValidationParams) -> dict:
        bound = getattr(rules, value) if isinstance(value, str) else value
        return {"min_value": bound, "max_value": bound}
    return rule


IMAGE, MASK = "image_path", "mask_path"
IN_SET, BETWEEN = "ExpectColumnValuesToBeInSet", "ExpectColumnValuesToBeBetween"

# In report order. A name is the contract with params.yaml and docs/validation.md: keep it stable.
CHECKS: tuple[Check, ...] = (
    Check("row_count", "at least {min_frames} frames", "ExpectTableRowCountToBeBetween",
          rule=lambda r: {"min_value": r.min_frames}, rows="frames"),
    Check("subject_count", "at least {min_subjects} subjects", "ExpectColumnUniqueValueCountToBeBetween",
          "subject", lambda r: {"min_value": r.min_subjects}, "frames"),
    Check("names", "every file in train/ is named {{subject}}_{{n}}.tif or {{subject}}_{{n}}_mask.tif",
          IN_SET, "name_ok", _true, files=IMAGE),
    Check("unique_ids", "each frame id appears once", "ExpectColumnValuesToBeUnique", "frame_id", files=IMAGE),
    Check("mask_for_frame", "every frame has its mask", IN_SET, "mask_exists", _true, "named", IMAGE),
    Check("frame_for_mask", "every mask has its frame", IN_SET, "image_exists", _true, "named", MASK),
    Check("frame_decodes", "every frame file can be read and decoded as an image",
          IN_SET, "image_decodes", _true, "frames", IMAGE),
    Check("mask_decodes", "every mask file can be read and decoded as an image",
          IN_SET, "mask_decodes", _true, "masks", MASK),
    Check("frame_height", "frames are {frame_height} rows high",
          BETWEEN, "height", _exactly("frame_height"), "named", IMAGE),
    Check("frame_width", "frames are {frame_width} columns wide",
          BETWEEN, "width", _exactly("frame_width"), "named", IMAGE),
    Check("frame_channels", "frames are single-channel (grayscale)", BETWEEN, "channels", _exactly(1), "named", IMAGE),
    Check("frame_dtype", "frames are 8-bit (uint8)",
          IN_SET, "dtype", lambda r: {"value_set": ["uint8"]}, "named", IMAGE),
    Check("mask_height", "masks are {frame_height} rows high, like the frames",
          BETWEEN, "mask_height", _exactly("frame_height"), "named", MASK),
    Check("mask_width", "masks are {frame_width} columns wide, like the frames",
          BETWEEN, "mask_width", _exactly("frame_width"), "named", MASK),
    Check("mask_channels", "masks are single-channel", BETWEEN, "mask_channels", _exactly(1), "named", MASK),
    Check("mask_binary", "masks hold only 0 and 255 (or 0 and 1)", IN_SET, "mask_binary", _true, "named", MASK),
    Check("mask_area", "a non-empty mask covers {mask_area_min} to {mask_area_max} pixels", BETWEEN, "mask_area",
          lambda r: {"min_value": r.mask_area_min, "max_value": r.mask_area_max}, "nonempty_masks", MASK),
    Check("not_blank", "frames are not blank (intensity std above {blank_std_max})", BETWEEN, "intensity_std",
          lambda r: {"min_value": r.blank_std_max, "strict_min": True}, "named", IMAGE),
    Check("not_saturated", "frames are not saturated (mean intensity below {saturated_mean_min})",
          BETWEEN, "intensity_mean",
          lambda r: {"max_value": r.saturated_mean_min, "strict_max": True}, "named", IMAGE),
    # The pairs are found by pipeline.validation.duplicates; GX checks the column they fill in.
    Check("contradicting_duplicates",
          "no near-duplicate frames of one subject with contradicting masks (one empty and one not, or Dice "
          "below {near_duplicate_dice_min}; perceptual hashes at most {near_duplicate_max_bits} of 256 bits "
          "apart)", "ExpectColumnValuesToBeNull", "contradicting_duplicate_of", rows="named", files=IMAGE),
    # GX Core has no cross-batch expectations: pipeline.validation.drift compares the profiles.
    Check("drift", "figures close to the previous data version"),
)

BY_NAME: dict[str, Check] = {check.name: check for check in CHECKS}
GX_CHECKS: tuple[Check, ...] = tuple(c for c in CHECKS if c.expectation)
