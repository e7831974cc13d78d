"""Near-duplicate frames of one subject whose masks contradict.

Perceptual hashes (``phash``, 256 bits) of one subject's frames at most ``near_duplicate_max_bits``
apart make a near-duplicate pair; it contradicts when one mask is empty and the other not, or when
their Dice (on the 1/8 mask thumbnails) is below ``near_duplicate_dice_min``. The pairs are found here
and written into a column that the GX check ``contradicting_duplicates`` expects to be null.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.config import ValidationParams

PAIR_COLUMN = "contradicting_duplicate_of"  # GX expects it null (check contradicting_duplicates)


def _hash_bits(hexes: list[str]) -> np.ndarray:
    return np.unpackbits(
        np.frombuffer(bytes.fromhex("".join(hexes)), dtype=np.uint8).reshape(len(hexes), -1), axis=1
    )


def find_contradicting_pairs(manifest: pd.DataFrame, rules: ValidationParams) -> list[dict]:
    """Pairs of frames of one subject whose perceptual hashes are at most
    ``rules.near_duplicate_max_bits`` apart and whose masks contradict: one empty and one not,
    or both non-empty with Dice (on the 1/8 mask thumbnails) below ``near_duplicate_dice_min``.

    Returns dicts ``frame_a, frame_b, image_a, image_b, distance, area_a, area_b, dice`` (dice
    None when one mask is empty), ordered by subject and frame.
    """
    from pipeline.manifest import thumbnail_bits  # noqa: PLC0415

    needed = {"phash", "mask_area", "subject", "frame_id", "image_path"}
    if manifest.empty or not needed <= set(manifest.columns):
        return []
    ok = manifest["phash"].fillna("").str.len().eq(64) & manifest["mask_area"].notna()
    if "name_ok" in manifest:
        ok &= manifest["name_ok"].fillna(False).astype(bool)
    rows = manifest.loc[ok & manifest["subject"].notna()]
    pairs: list[dict] = []
    for _, group in rows.groupby("subject", sort=True):
        if len(group) < 2:
            continue
        bits = _hash_bits(group["phash"].tolist()).astype(np.float32)
        # Hamming distances of all pairs at once: ones(a) + ones(b) - 2 * common ones.
        ones = bits.sum(axis=1)
        dist = ones[:, None] + ones[None, :] - 2 * (bits @ bits.T)
        ia, ib = np.nonzero(np.triu(dist <= rules.near_duplicate_max_bits + 0.5, k=1))
        if not len(ia):
            continue
        areas = group["mask_area"].to_numpy()
        thumbs = group["mask_thumb"].fillna("").tolist() if "mask_thumb" in group else None
        ids, images = group["frame_id"].tolist(), group["image_path"].tolist()
        for i, j in zip(ia.tolist(), ib.tolist()):
            a, b = int(areas[i]), int(areas[j])
            if (a == 0) and (b == 0):
                continue
            dice = None
            if a and b:
                if not thumbs or not thumbs[i] or not thumbs[j]:
                    continue
                x, y = thumbnail_bits(thumbs[i]), thumbnail_bits(thumbs[j])
                total = int(x.sum()) + int(y.sum())
                dice = 2 * int((x & y).sum()) / total if total else 1.0
                if dice >= rules.near_duplicate_dice_min:
                    continue
                dice = round(dice, 3)
            pairs.append({
                "frame_a": ids[i], "frame_b": ids[j], "image_a": images[i], "image_b": images[j],
                "distance": int(round(dist[i, j])), "area_a": a, "area_b": b, "dice": dice,
            })
    return pairs


def with_pair_column(manifest: pd.DataFrame, pairs: list[dict]) -> pd.DataFrame:
    """``manifest`` with :data:`PAIR_COLUMN`: each paired frame's partner (its first), else None."""
    partner: dict[str, str] = {}
    for p in pairs:
        partner.setdefault(p["frame_a"], p["frame_b"])
        partner.setdefault(p["frame_b"], p["frame_a"])
    frame = manifest.reset_index(drop=True)
    ids = frame["frame_id"] if "frame_id" in frame else pd.Series("", index=frame.index)
    frame[PAIR_COLUMN] = ids.map(partner).astype(object).where(ids.isin(list(partner)), None)
    return frame


def attach_pairs(failures: list, pairs: list[dict]) -> None:
    """Give the ``contradicting_duplicates`` failure its pairs, and as files both frames of each (GX's
    rows name each frame once, without its partner)."""
    for failure in failures:
        if failure.check == "contradicting_duplicates" and pairs:
            failure.details["pairs"] = pairs
            failure.details["pair_count"] = len(pairs)
            failure.files = list(dict.fromkeys(f for p in pairs for f in (p["image_a"], p["image_b"])))
