"""A small built-in demo dataset: onset/apex pairs with micro-expression-sized facial motion.

Made from a public-domain face photograph that ships inside an installed package (matplotlib's
``grace_hopper.jpg``), so it needs no download and no licensed data. Deterministic for a seed.

- Pseudo-subjects: each applies its own similarity transform (rotation +-6 deg, scale 0.85-1.1,
  shift), lighting (gain, gamma, a left-right gradient) and sensor noise to the photograph.
- Samples: the onset is the subject's image; the apex is the onset warped by a class-specific
  displacement field of micro-expression amplitude (1-2 px at a ~100 px face), placed with the five
  MTCNN landmarks of the photograph:
  positive = lip corners pulled up and outwards; negative = brows lowered and drawn together;
  surprise = brows raised and jaw dropped.
- Output: ``frames/<subject>/<sample>/{onset,apex}.png`` and ``demo_manifest.csv`` in the manifest
  format (``subject,sample_id,onset_path,apex_path,label``), which ``python -m preprocess --dataset
  manifest`` reads.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

DEMO_CLASSES = ("negative", "positive", "surprise")
BASE_WIDTH = 256  # the photograph is scaled to this width (face ~90-100 px)


def base_photo() -> np.ndarray:
    """matplotlib's public-domain ``grace_hopper.jpg`` as RGB uint8, BASE_WIDTH wide.

    Raises:
        FileNotFoundError: matplotlib's sample data is not installed.
    """
    import matplotlib.cbook as cbook

    path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    img = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    h, w = img.shape[:2]
    return cv2.resize(img, (BASE_WIDTH, round(h * BASE_WIDTH / w)), interpolation=cv2.INTER_AREA)


def landmarks(img: np.ndarray) -> np.ndarray:
    """Five MTCNN landmarks (left eye, right eye, nose, left mouth corner, right mouth corner), (5, 2) x, y.

    Raises:
        RuntimeError: no face found.
    """
    from facenet_pytorch import MTCNN
    from PIL import Image

    _, probs, points = MTCNN(keep_all=True, device="cpu").detect(Image.fromarray(img), landmarks=True)
    if points is None:
        raise RuntimeError("MTCNN found no face in the demo photograph")
    return np.asarray(points[int(np.argmax(probs))], dtype=np.float64)


def _bump(xx, yy, cx, cy, sigma):
    return np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))


def motion_field(shape: tuple[int, int], pts: np.ndarray, label: str, amplitude: float) -> tuple[np.ndarray, np.ndarray]:
    """Displacement (dx, dy) in pixels, each (H, W), of one class's facial action at the landmarks ``pts``.

    Raises:
        ValueError: for a label outside ``DEMO_CLASSES``.
    """
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    le, re, nose, lm, rm = pts
    eye_d = np.linalg.norm(re - le)
    sig = 0.18 * eye_d
    dx, dy = np.zeros((h, w)), np.zeros((h, w))
    brow_l, brow_r = le + [0, -0.35 * eye_d], re + [0, -0.35 * eye_d]
    if label == "positive":  # lip corners up and out (AU12)
        for corner, side in ((lm, -1), (rm, 1)):
            b = _bump(xx, yy, *corner, sig)
            dx += side * 0.6 * amplitude * b
            dy += -amplitude * b
    elif label == "negative":  # brows lowered and drawn together (AU4)
        for brow, side in ((brow_l, 1), (brow_r, -1)):
            b = _bump(xx, yy, *brow, 1.3 * sig)
            dy += amplitude * b
            dx += side * 0.5 * amplitude * b
    elif label == "surprise":  # brows raised (AU1+2) and jaw dropped (AU26)
        for brow in (brow_l, brow_r):
            dy += -amplitude * _bump(xx, yy, *brow, 1.3 * sig)
        chin = (lm + rm) / 2 + [0, 0.55 * eye_d]
        dy += 1.3 * amplitude * _bump(xx, yy, *chin, 1.5 * sig)
    else:
        raise ValueError(f"demo label must be one of {DEMO_CLASSES}, got {label!r}")
    return dx, dy


def warp(img: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Move image content by (dx, dy) pixels: ``out[y + dy, x + dx] ~ img[y, x]`` (backward map)."""
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return cv2.remap(img, xx - dx.astype(np.float32), yy - dy.astype(np.float32), cv2.INTER_CUBIC,
                     borderMode=cv2.BORDER_REFLECT)


def _subject_view(img: np.ndarray, pts: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A pseudo-subject: pose, scale and lighting applied to the photograph; landmarks moved along."""
    h, w = img.shape[:2]
    angle, scale = rng.uniform(-6, 6), rng.uniform(0.85, 1.1)
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    m[:, 2] += rng.uniform(-0.05, 0.05, 2) * [w, h]
    view = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT).astype(np.float64)
    gain, gamma = rng.uniform(0.75, 1.2), rng.uniform(0.8, 1.25)
    ramp = np.linspace(-1, 1, w)[None, :, None] * rng.uniform(-25, 25)
    view = np.clip(255 * (np.clip(view * gain + ramp, 0, 255) / 255) ** gamma, 0, 255)
    return view.astype(np.uint8), (np.c_[pts, np.ones(len(pts))] @ m.T)


def make_demo_dataset(out: str | Path, subjects: int = 6, samples_per_class: int = 3, seed: int = 0) -> Path:
    """Write the demo dataset and return its manifest CSV path.

    Args:
        out: folder to write into (created).
        subjects: number of pseudo-subjects (LOSO folds).
        samples_per_class: samples of each class per subject.
        seed: RNG seed; the same seed writes the same pixels.

    Returns:
        Path of ``demo_manifest.csv``.
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    img = base_photo()
    pts = landmarks(img)
    rows = []
    for s in range(subjects):
        subject = f"demo{s + 1:02d}"
        view, vpts = _subject_view(img, pts, rng)
        for label in DEMO_CLASSES:
            for k in range(samples_per_class):
                sample_id = f"{subject}_{label[:3]}_{k + 1:02d}"
                onset = np.clip(view + rng.normal(0, 1.5, view.shape), 0, 255).astype(np.uint8)
                dx, dy = motion_field(view.shape[:2], vpts, label, amplitude=rng.uniform(1.0, 2.0))
                apex = np.clip(warp(view, dx, dy) + rng.normal(0, 1.5, view.shape), 0, 255).astype(np.uint8)
                folder = out / "frames" / subject / sample_id
                folder.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(folder / "onset.png"), cv2.cvtColor(onset, cv2.COLOR_RGB2BGR))
                cv2.imwrite(str(folder / "apex.png"), cv2.cvtColor(apex, cv2.COLOR_RGB2BGR))
                rows.append(dict(subject=subject, sample_id=sample_id,
                                 onset_path=f"frames/{subject}/{sample_id}/onset.png",
                                 apex_path=f"frames/{subject}/{sample_id}/apex.png", label=label))
    path = out / "demo_manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


# The raw releases' layouts, for tests and for trying a CDE composite built from raw frames. Emotions are
# the datasets' own words, chosen so that each maps to the MEGC2019 class of the demo's motion.
RAW_EMOTIONS = {
    "casme2": {"negative": "disgust", "positive": "happiness", "surprise": "surprise"},
    "samm": {"negative": "Anger", "positive": "Happiness", "surprise": "Surprise"},
    "smic": {"negative": "negative", "positive": "positive", "surprise": "surprise"},
}


def _raw_clip(root: Path, dataset: str, s: int, ci: int, k: int, label: str, numbers: tuple[int, int, int]
              ) -> tuple[Path, list[str], dict | None]:
    """One clip of a raw layout: its folder, its frame file names (onset, apex, offset) and its annotation
    sheet row (None for SMIC, whose folders are its labels)."""
    onset_no, apex_no, offset_no = numbers
    emotion = RAW_EMOTIONS[dataset][label]
    if dataset == "casme2":
        subject, clip = f"sub{s + 1:02d}", f"EP{ci + 1:02d}_{k + 1:02d}"
        row = dict(Subject=s + 1, Filename=clip, OnsetFrame=onset_no, ApexFrame=apex_no, OffsetFrame=offset_no,
                   **{"Action Units": "4", "Estimated Emotion": emotion})
        return root / "CASME2_RAW_selected" / subject / clip, [f"img{n}.jpg" for n in numbers], row
    if dataset == "samm":
        subject, clip = f"{s + 101:03d}", f"{s + 101:03d}_{ci + 1}_{k + 1}"
        row = dict(Subject=s + 101, Filename=clip, **{"Onset Frame": onset_no, "Apex Frame": apex_no,
                                                      "Offset Frame": offset_no, "Action Units": "4",
                                                      "Estimated Emotion": emotion})
        return root / "SAMM" / subject / clip, [f"{subject}_{n:05d}.jpg" for n in numbers], row
    subject = f"s{s + 1}"
    clip = f"{subject}_{label[:2]}_{k + 1:02d}"
    return root / "HS" / subject / "micro" / label / clip, [f"image{n}.bmp" for n in numbers], None


def make_raw_layouts(out: str | Path, subjects: int = 2, samples_per_class: int = 1, seed: int = 0) -> dict[str, Path]:
    """Write small CASME II, SAMM and SMIC-HS roots in their released layouts, with their annotation
    sheets, from the demo's pseudo-subjects and motions; the adapters read them as the real releases.

    Layouts: ``casme2/CASME2_RAW_selected/subNN/EPnn_kk/img<frame>.jpg`` + ``CASME2-coding-demo.xlsx``;
    ``samm/SAMM/0NN/0NN_n_k/0NN_<frame:05d>.jpg`` + ``SAMM_Micro_FACS_Codes_demo.xlsx`` (13 preamble rows
    before its header, as SAMM's sheet); ``smic/HS/sN/micro/<class>/sN_xx_kk/image<frame>.bmp`` (no apex
    list: the middle frame is the apex). Each clip holds onset, apex and offset frames (offset = onset).

    Args:
        out: folder to write into; subjects: pseudo-subjects per dataset (distinct across datasets);
        samples_per_class: clips of each class per subject; seed: RNG seed.

    Returns:
        dataset format -> root.
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    img = base_photo()
    pts = landmarks(img)
    sheets: dict[str, list] = {"casme2": [], "samm": []}
    roots = {d: out / d for d in RAW_EMOTIONS}

    def frames(view, vpts, label):
        onset = np.clip(view + rng.normal(0, 1.5, view.shape), 0, 255).astype(np.uint8)
        dx, dy = motion_field(view.shape[:2], vpts, label, amplitude=rng.uniform(1.0, 2.0))
        apex = np.clip(warp(view, dx, dy) + rng.normal(0, 1.5, view.shape), 0, 255).astype(np.uint8)
        return [cv2.cvtColor(f, cv2.COLOR_RGB2BGR) for f in (onset, apex, onset)]

    for dataset in RAW_EMOTIONS:
        for s in range(subjects):
            view, vpts = _subject_view(img, pts, rng)
            for ci, label in enumerate(DEMO_CLASSES):
                for k in range(samples_per_class):
                    numbers = (100 + 10 * k, 103 + 10 * k, 106 + 10 * k)  # onset, apex, offset
                    folder, names, row = _raw_clip(roots[dataset], dataset, s, ci, k, label, numbers)
                    if row is not None:
                        sheets[dataset].append(row)
                    folder.mkdir(parents=True, exist_ok=True)
                    for name, frame in zip(names, frames(view, vpts, label)):
                        cv2.imwrite(str(folder / name), frame)
    pd.DataFrame(sheets["casme2"]).to_excel(roots["casme2"] / "CASME2-coding-demo.xlsx", index=False)
    with pd.ExcelWriter(roots["samm"] / "SAMM_Micro_FACS_Codes_demo.xlsx") as xw:
        preamble = pd.DataFrame([[f"demo SAMM sheet, preamble row {i + 1}"] for i in range(13)])
        preamble.to_excel(xw, index=False, header=False)
        pd.DataFrame(sheets["samm"]).to_excel(xw, index=False, startrow=13)
    return roots
