"""MEGC2019 composite (CDE) as published with STSTNet and HTNet: precomputed optical-flow images.

Layout of the root folder (see ``../shared/data/README.md``):

- ``combined_3class_gt.csv``: no header, columns ``dataset,subject,filename,label``; label 0 =
  negative, 1 = positive, 2 = surprise; SAMM subjects written as integers (``6`` for ``006``).
- ``flow/<subject>_<filename> .png`` (a space before ``.png``; SAMM subjects zero-padded to 3 digits):
  28 x 28 RGB, R = u (horizontal flow), G = v (vertical flow), B = optical strain, each channel
  min-max scaled to 0..255 per image (STSTNet, HTNet ``datasets/STSNet_whole_norm_u_v_os``).

The flow stages of the pipeline are skipped for this format: the images ARE the flows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

CDE_CLASSES = ("negative", "positive", "surprise")
GT_FILE = "combined_3class_gt.csv"
# Pixel values are 0..255 after a per-image min-max scaling by the publishers; we divide by this.
FLOW_IMAGE_SCALE = 255.0


def _subject(dataset: str, subject: str) -> str:
    subject = str(subject).strip()
    return subject.zfill(3) if dataset == "samm" else subject


def read_ground_truth(root: str | Path) -> pd.DataFrame:
    """Read the composite's ground truth into one row per sample.

    Args:
        root: folder holding ``combined_3class_gt.csv`` and ``flow/``.

    Returns:
        DataFrame with columns ``dataset`` (casme2, samm, smic), ``subject`` (SAMM zero-padded to 3
        digits, as in the image names), ``sample_id`` (the filename column), ``label`` (int 0..2),
        ``emotion`` (negative / positive / surprise) and ``flow_path`` (absolute path of the image).

    Raises:
        FileNotFoundError: if the CSV is missing.
        ValueError: if a row is malformed or a label lies outside 0..2.
    """
    root = Path(root).resolve()  # the shard cache key must not depend on how the path is spelled
    gt = root / GT_FILE
    if not gt.is_file():
        raise FileNotFoundError(f"{gt} not found: is {root} the MEGC2019 composite folder?")
    df = pd.read_csv(gt, header=None, names=["dataset", "subject", "sample_id", "label"], dtype=str)
    df = df.apply(lambda c: c.str.strip())
    if df.isna().any().any():
        raise ValueError(f"{gt}: rows with missing fields: {df[df.isna().any(axis=1)].index.tolist()}")
    df["label"] = df["label"].astype(int)
    if not df["label"].between(0, len(CDE_CLASSES) - 1).all():
        raise ValueError(f"{gt}: labels outside 0..{len(CDE_CLASSES) - 1}")
    df["subject"] = [_subject(d, s) for d, s in zip(df["dataset"], df["subject"])]
    df["emotion"] = [CDE_CLASSES[i] for i in df["label"]]
    df["flow_path"] = [str(root / "flow" / f"{s}_{f} .png") for s, f in zip(df["subject"], df["sample_id"])]
    return df


def read_flow_image(path: str | Path) -> np.ndarray:
    """One published flow image -> (H, W, 3) float32 [u, v, strain] in 0..1 (pixel / 255).

    Raises:
        FileNotFoundError / PIL.UnidentifiedImageError: for a missing or unreadable file.
        ValueError: if the image does not have 3 channels.
    """
    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB") if im.mode in ("RGBA", "P") else im)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"{path}: expected an RGB flow image, got shape {a.shape}")
    return a.astype(np.float32) / FLOW_IMAGE_SCALE


def load_composite(root: str | Path) -> tuple[pd.DataFrame, np.ndarray]:
    """Ground truth and all flows of the composite, in ground-truth order.

    Returns:
        (table from :func:`read_ground_truth`, flows (N, 28, 28, 3) float32).

    Raises:
        as :func:`read_ground_truth` and :func:`read_flow_image`.
    """
    df = read_ground_truth(root)
    flows = np.stack([read_flow_image(p) for p in df["flow_path"]])
    return df, flows
