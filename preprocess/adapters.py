"""Dataset adapters: a dataset root -> one sample record per micro-expression, plus rejects.

Every adapter returns an :class:`AdapterResult`: ``samples`` (one row per usable sample, columns
``SAMPLE_COLUMNS``) and ``rejects`` (rows with ``reason``), never silently dropping anything. Frames
are not opened here; a missing frame is found, and rejected, by the decode stage.

Label sets follow EPIR Sec. 4: SDE uses each dataset's own classes (CASME II 5, SAMM 5, SMIC 3,
CAS(ME)^3 3); CDE is the MEGC2019 3-class composite (negative, positive, surprise). The MEGC2019
mapping reproduces the official composite exactly (``../shared/data/README.md``).

Annotation rules (reported in the ``note`` column and the run summary, never a crash):
- an apex that is not a number ('/' in CASME II's 2019 sheet) -> the middle frame
  ``(onset + offset) // 2``;
- an apex outside onset..offset (SAMM 028_4_1 and 032_3_1) -> the middle frame likewise;
- an emotion in neither the SDE nor the CDE mapping -> rejected, reason ``label_outside_mapping``;
- a sample id seen before in the same dataset -> the later one rejected, ``duplicate_sample_id``;
- an apex that is not a number with no offset to take the middle of -> rejected, ``bad_annotation``.

An adapter marks a row it cannot use with ``reject=(reason, detail)``; :func:`_finish` moves such
rows, and the label and duplicate rejects, to the rejects table.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .megc2019 import CDE_CLASSES, read_ground_truth

SDE_CLASSES = {
    "casme2": ("happiness", "disgust", "surprise", "repression", "others"),
    "samm": ("happiness", "anger", "surprise", "contempt", "others"),
    "smic": ("negative", "positive", "surprise"),
    "casme3": ("negative", "positive", "surprise"),
}
# emotion (lower case) -> SDE class / CDE class; absent = not used by that protocol
SDE_MAP = {
    "casme2": {e: e for e in SDE_CLASSES["casme2"]},
    "samm": {"happiness": "happiness", "anger": "anger", "surprise": "surprise", "contempt": "contempt", "other": "others"},
    "smic": {e: e for e in SDE_CLASSES["smic"]},
    "casme3": {"happy": "positive", "surprise": "surprise", "disgust": "negative", "fear": "negative",
               "anger": "negative", "sad": "negative"},
}
CDE_MAP = {
    "casme2": {"happiness": "positive", "surprise": "surprise", "disgust": "negative", "repression": "negative"},
    "samm": {"happiness": "positive", "surprise": "surprise", "anger": "negative", "contempt": "negative",
             "disgust": "negative", "fear": "negative", "sadness": "negative"},
    "smic": {e: e for e in CDE_CLASSES},
}
# The official MEGC2019 list leaves these CASME II samples out although their emotion maps; and it was
# built on the 2014 coding, so the three samples the 2019 revision relabelled sadness -> surprise are
# not in it either.
CASME2_CDE_EXCLUDED = {("sub04", "EP12_01f"), ("sub05", "EP09_05f"),
                       ("sub24", "EP07_01"), ("sub24", "EP07_04f"), ("sub24", "EP10_03")}

SAMPLE_COLUMNS = [
    "dataset", "subject", "sample_id", "onset_path", "apex_path", "flow_path", "emotion",
    "sde_class", "sde_label", "cde_class", "cde_label", "action_units",
    "onset_frame", "apex_frame", "offset_frame", "precropped", "note", "meta",
]

REJECT_COLUMNS = ["dataset", "subject", "sample_id", "reason", "detail"]


class DatasetError(Exception):
    """The dataset root or its annotation file is wrong as a whole (not one bad sample)."""


@dataclass
class AdapterResult:
    """Samples and rejects of one dataset.

    Attributes:
        samples: DataFrame with ``SAMPLE_COLUMNS``; ``sde_label`` / ``cde_label`` nullable ints.
        rejects: DataFrame with ``REJECT_COLUMNS`` (dataset, subject, sample_id, reason, detail).
        classes: ``{"sde": [...], "cde": [...]}`` the label names, index = label.
        subset_of: the data key (``<dataset>/<protocol>``) whose samples these are a subset of (the composite's
            source datasets, :func:`megc2019` ``source``), else empty.
    """

    samples: pd.DataFrame
    rejects: pd.DataFrame
    classes: dict = field(default_factory=dict)
    subset_of: str = ""


def _find_sheet(root: Path, annotations: Path | None, patterns: list[str], what: str) -> Path:
    if annotations is not None:
        if not Path(annotations).is_file():
            raise DatasetError(f"annotation file {annotations} not found")
        return Path(annotations)
    for pat in patterns:
        hits = sorted(root.glob(pat))
        if hits:
            return hits[-1]  # the latest revision by name
    raise DatasetError(f"no {what} found in {root} (looked for {', '.join(patterns)}); pass --annotations")


def _require_columns(df: pd.DataFrame, need: set[str], sheet: Path) -> None:
    if not need <= set(df.columns):
        raise DatasetError(f"{sheet}: missing columns {sorted(need - set(df.columns))}")


def _apex_rule(onset: int, apex, offset) -> tuple[int | None, str]:
    """Apply the stated apex rules; return (apex, note), apex None when no rule can repair it."""
    try:
        apex_i = int(float(str(apex).strip()))
    except ValueError:
        if offset is None:
            return None, f"apex {str(apex).strip()!r} not a number and no offset"
        return (onset + offset) // 2, f"apex {str(apex).strip()!r} not a number -> middle frame of onset..offset"
    if offset is not None and not onset <= apex_i <= offset:
        return (onset + offset) // 2, f"apex {apex_i} outside onset..offset {onset}..{offset} -> middle frame"
    return apex_i, ""


def _sheet_row(subject: str, sample_id: str, onset: int, apex, offset: int) -> dict:
    """The frame fields of an annotation-sheet row, with the apex rules applied (or a reject)."""
    apex_no, note = _apex_rule(onset, apex, offset if offset > 0 else None)
    row = dict(subject=subject, sample_id=sample_id, onset_frame=onset, apex_frame=apex_no, offset_frame=offset,
               note=note)
    if apex_no is None:
        row["reject"] = ("bad_annotation", note)
    return row


def _finish(dataset: str, rows: list[dict], sde_classes, cde_classes=CDE_CLASSES) -> AdapterResult:
    """Rejects, label indices, duplicate check and column order, shared by every adapter.

    A row carrying ``reject=(reason, detail)``, or whose emotion is in neither mapping, or whose
    subject and sample id were seen before, goes to the rejects table with that reason.
    """
    rejects, kept = [], []
    for r in rows:
        reason = r.pop("reject", None)
        if reason is None and r.get("sde_class") is None and r.get("cde_class") is None:
            reason = ("label_outside_mapping", f"emotion {r.get('emotion')!r}")
        if reason is None:
            kept.append(r)
        else:
            rejects.append(dict(dataset=dataset, subject=r["subject"], sample_id=r["sample_id"],
                                reason=reason[0], detail=reason[1]))
    df = pd.DataFrame(kept, columns=SAMPLE_COLUMNS)
    dup = df.duplicated(["subject", "sample_id"], keep="first")
    for r in df[dup].itertuples(index=False):
        rejects.append(dict(dataset=dataset, subject=r.subject, sample_id=r.sample_id,
                            reason="duplicate_sample_id", detail="same subject and sample id seen before"))
    df = df[~dup].reset_index(drop=True)
    df["sde_label"] = pd.array([None if pd.isna(c) else sde_classes.index(c) for c in df["sde_class"]], dtype="Int64")
    df["cde_label"] = pd.array([None if pd.isna(c) else cde_classes.index(c) for c in df["cde_class"]], dtype="Int64")
    for col in ("onset_frame", "apex_frame", "offset_frame"):
        df[col] = pd.array(df[col], dtype="Int64")
    df["dataset"] = dataset
    # column-wise fillna would hit an all-missing (float) column, which pandas will refuse
    df["note"] = ["" if pd.isna(v) else v for v in df["note"]]
    df["precropped"] = [False if pd.isna(v) else bool(v) for v in df["precropped"]]
    rej = pd.DataFrame(rejects, columns=REJECT_COLUMNS)
    return AdapterResult(df[SAMPLE_COLUMNS], rej, {"sde": list(sde_classes), "cde": list(cde_classes)})


def _au(value) -> str | None:
    return None if pd.isna(value) else str(value).strip()


# --- CASME II ---------------------------------------------------------------------------------

def casme2(root: Path, annotations: Path | None = None) -> AdapterResult:
    """CASME II: ``CASME2_RAW_selected/sub01/EP02_01f/img46.jpg`` or the cropped release
    ``Cropped/sub01/EP02_01f/reg_img46.jpg`` (pre-cropped: whole frame = face), with the coding
    spreadsheet (2014 or 2019 revision; ``CASME2-coding-*.xlsx`` in the root by default).

    Raises:
        DatasetError: no frame folder or no coding sheet, or the sheet lacks its columns.
    """
    root = Path(root).resolve()  # the shard cache key must not depend on how the path is spelled
    if (root / "CASME2_RAW_selected").is_dir():
        frames, prefix, precropped = root / "CASME2_RAW_selected", "img", False
    elif (root / "Cropped").is_dir():
        frames, prefix, precropped = root / "Cropped", "reg_img", True
    else:
        raise DatasetError(f"{root} holds neither CASME2_RAW_selected/ nor Cropped/: is it the CASME II root?")
    sheet = _find_sheet(root, annotations, ["CASME2-coding-*.xlsx", "CASME2*coding*.xls*"], "CASME II coding sheet")
    df = pd.read_excel(sheet)
    _require_columns(df, {"Subject", "Filename", "OnsetFrame", "ApexFrame", "OffsetFrame", "Estimated Emotion"}, sheet)
    rows = []
    for r in df.to_dict("records"):
        subject = f"sub{int(r['Subject']):02d}"
        fn = str(r["Filename"]).strip()
        row = _sheet_row(subject, fn, int(r["OnsetFrame"]), r["ApexFrame"], int(r["OffsetFrame"]))
        emotion = str(r["Estimated Emotion"]).strip().lower()
        excluded = (subject, fn) in CASME2_CDE_EXCLUDED
        rows.append(dict(
            row, emotion=emotion, sde_class=SDE_MAP["casme2"].get(emotion),
            cde_class=None if excluded else CDE_MAP["casme2"].get(emotion),
            action_units=_au(r.get("Action Units")), precropped=precropped,
            onset_path=str(frames / subject / fn / f"{prefix}{row['onset_frame']}.jpg"),
            apex_path=str(frames / subject / fn / f"{prefix}{row['apex_frame']}.jpg"),
        ))
    return _finish("casme2", rows, SDE_CLASSES["casme2"])


# --- SAMM ---------------------------------------------------------------------------------------

def _read_samm_sheet(sheet: Path) -> pd.DataFrame:
    raw = pd.read_excel(sheet, header=None)
    hits = raw.index[raw.iloc[:, 0].astype(str).str.strip() == "Subject"]
    if len(hits) == 0:
        raise DatasetError(f"{sheet}: no header row starting with 'Subject' (SAMM's sheet has 13 preamble rows)")
    return pd.read_excel(sheet, header=int(hits[0]))


def samm(root: Path, annotations: Path | None = None) -> AdapterResult:
    """SAMM: ``SAMM/006/006_1_2/006_05562.jpg`` with ``SAMM_Micro_FACS_Codes_v2.xlsx`` (its header row
    is found after the preamble). SAMM subjects are zero-padded to 3 digits.

    Raises:
        DatasetError: no ``SAMM/`` (or subject) folders, or no FACS-codes sheet.
    """
    root = Path(root).resolve()  # the shard cache key must not depend on how the path is spelled
    frames = root / "SAMM" if (root / "SAMM").is_dir() else root
    if not frames.is_dir() or not any(p.is_dir() and re.fullmatch(r"\d{3}", p.name) for p in frames.iterdir()):
        raise DatasetError(f"{root} holds no SAMM/ folder of 3-digit subject folders: is it the SAMM root?")
    sheet = _find_sheet(root, annotations, ["SAMM_Micro_FACS_Codes*.xlsx", "SAMM*.xlsx"], "SAMM FACS-codes sheet")
    df = _read_samm_sheet(sheet)
    _require_columns(df, {"Subject", "Filename", "Onset Frame", "Apex Frame", "Offset Frame", "Estimated Emotion"}, sheet)
    rows = []
    for r in df.dropna(subset=["Filename"]).to_dict("records"):
        subject = f"{int(r['Subject']):03d}"
        fn = str(r["Filename"]).strip()
        row = _sheet_row(subject, fn, int(r["Onset Frame"]), r["Apex Frame"], int(r["Offset Frame"]))
        emotion = str(r["Estimated Emotion"]).strip().lower()
        clip = frames / subject / fn
        rows.append(dict(
            row, emotion=emotion, sde_class=SDE_MAP["samm"].get(emotion), cde_class=CDE_MAP["samm"].get(emotion),
            action_units=_au(r.get("Action Units")),
            onset_path=str(clip / f"{subject}_{row['onset_frame']:05d}.jpg"),
            apex_path=str(clip / f"{subject}_{row['apex_frame'] or 0:05d}.jpg"),
        ))
    return _finish("samm", rows, SDE_CLASSES["samm"])


# --- SMIC-HS ------------------------------------------------------------------------------------

_SMIC_CLIP = re.compile(r"s(\d+)_([a-z]+)_(\d+)$")
_FRAME_NO = re.compile(r"(\d+)\D*$")


def smic_clip_id(clip: str) -> tuple[str, str]:
    """SMIC clip name -> (subject, sample id) as the MEGC2019 composite writes them: ``s1_ne_01`` ->
    (``s01``, ``s01_ne_01``).

    Raises:
        ValueError: for a name that is not ``s<n>_<cls>_<k>``.
    """
    m = _SMIC_CLIP.match(clip.strip())
    if not m:
        raise ValueError(f"not a SMIC clip name: {clip!r}")
    subject = f"s{int(m.group(1)):02d}"
    return subject, f"{subject}_{m.group(2)}_{m.group(3)}"


def frame_number(path: Path) -> int | None:
    """The trailing number of a frame file name (``image559753.bmp`` -> 559753), or None."""
    m = _FRAME_NO.search(path.stem)
    return int(m.group(1)) if m else None


def smic(root: Path, annotations: Path | None = None) -> AdapterResult:
    """SMIC-HS: labels from folders, ``HS/s1/micro/negative/s1_ne_01/image*.bmp``.

    Onset = the clip's first frame. Apex = the apex list's frame when an apex list is given
    (``--annotations``, or ``*apex*.xlsx`` in the root: columns ``clip, apex_frame``); otherwise, and
    for clips the list lacks, the documented rule: the clip's middle frame (SMIC-HS ships no apex).

    Raises:
        DatasetError: no ``HS/`` folder of ``s<n>/micro/<class>/`` clips.
    """
    root = Path(root).resolve()  # the shard cache key must not depend on how the path is spelled
    hs = root / "HS" if (root / "HS").is_dir() else root
    clips = sorted(p for p in hs.glob("s*/micro/*/*") if p.is_dir())
    if not clips:
        raise DatasetError(f"{root} holds no HS/s<n>/micro/<class>/<clip>/ folders: is it the SMIC root?")
    apex_list: dict[str, int] = {}
    sheet = annotations if annotations is not None else next(iter(sorted(root.glob("*apex*.xls*"))), None)
    if sheet is not None:
        if not Path(sheet).is_file():
            raise DatasetError(f"annotation file {sheet} not found")
        lst = pd.read_excel(sheet)
        if not {"clip", "apex_frame"} <= set(lst.columns):
            raise DatasetError(f"{sheet}: an SMIC apex list needs columns 'clip' and 'apex_frame'")
        apex_list = {smic_clip_id(c)[1]: int(a) for c, a in zip(lst["clip"], lst["apex_frame"])}
    rows = []
    for clip in clips:
        emotion = clip.parent.name.lower()
        try:
            subject, sample_id = smic_clip_id(clip.name)
        except ValueError as e:
            rows.append(dict(subject=clip.parents[2].name, sample_id=clip.name, reject=("bad_sample_name", str(e))))
            continue
        frames = sorted((f for f in clip.iterdir() if f.suffix.lower() in (".bmp", ".jpg", ".png")),
                        key=lambda f: (frame_number(f) is None, frame_number(f) or 0, f.name))
        if not frames:
            rows.append(dict(subject=subject, sample_id=sample_id, reject=("missing_frame", f"{clip} holds no frames")))
            continue
        numbers = [frame_number(f) for f in frames]
        if sample_id in apex_list:
            apex_no = apex_list[sample_id]
            apex_path = next((f for f, n in zip(frames, numbers) if n == apex_no),
                             clip / f"image{apex_no}{frames[0].suffix}")
            note = ""
        else:
            apex_path = frames[len(frames) // 2]
            apex_no = numbers[len(frames) // 2]
            note = "no apex in the list -> middle frame of the clip"
        rows.append(dict(
            subject=subject, sample_id=sample_id, emotion=emotion,
            sde_class=SDE_MAP["smic"].get(emotion), cde_class=CDE_MAP["smic"].get(emotion),
            onset_frame=numbers[0], apex_frame=apex_no, offset_frame=numbers[-1], note=note,
            onset_path=str(frames[0]), apex_path=str(apex_path),
        ))
    return _finish("smic", rows, SDE_CLASSES["smic"])


# --- CAS(ME)^3 Part A ---------------------------------------------------------------------------

def casme3(root: Path, annotations: Path | None = None) -> AdapterResult:
    """CAS(ME)^3 Part A micro-expressions: ``part_A/<Subject>/<Filename>/color/<frame>.jpg`` with
    the label sheet (``cas(me)3_part_A_ME_label*.xlsx`` in the root by default). A clip can hold
    several micro-expressions, so the sample id is ``<Subject>_<Filename>_<Onset>``. SDE is the
    3-class relabelling (EPIR Sec. 4): happy -> positive; disgust, fear, anger, sad -> negative;
    surprise -> surprise; others are outside the mapping. Not part of the MEGC2019 composite.

    Raises:
        DatasetError: no ``part_A/`` folder or no label sheet.
    """
    root = Path(root).resolve()  # the shard cache key must not depend on how the path is spelled
    part_a = root / "part_A"
    if not part_a.is_dir():
        raise DatasetError(f"{root} holds no part_A/ folder: is it the CAS(ME)^3 root?")
    sheet = _find_sheet(root, annotations, ["cas(me)3_part_A_ME_label*.xlsx", "*part_A*label*.xlsx"],
                        "CAS(ME)^3 Part A label sheet")
    df = pd.read_excel(sheet)
    _require_columns(df, {"Subject", "Filename", "Onset", "Apex", "Offset", "emotion"}, sheet)
    rows = []
    for r in df.to_dict("records"):
        subject, fn = str(r["Subject"]).strip(), str(r["Filename"]).strip()
        onset = int(r["Onset"])
        row = _sheet_row(subject, f"{subject}_{fn}_{onset}", onset, r["Apex"], int(r["Offset"]))
        emotion = str(r["emotion"]).strip().lower()
        clip = part_a / subject / fn / "color"
        rows.append(dict(
            row, emotion=emotion, sde_class=SDE_MAP["casme3"].get(emotion), cde_class=None,
            action_units=_au(r.get("AU")),
            onset_path=str(clip / f"{onset}.jpg"), apex_path=str(clip / f"{row['apex_frame']}.jpg"),
        ))
    return _finish("casme3", rows, SDE_CLASSES["casme3"])


# --- MEGC2019 precomputed flow images ------------------------------------------------------------

MEGC2019_SOURCES = ("casme2", "samm", "smic")  # the composite's source datasets, each an SDE subset (``source``)


HTNET_APEX_CSV = "combined_3_class2_for_optical_flow.csv"  # HTNet's table of its apex crops (../shared/data/htnet_apex)


def htnet_apex_paths(apex: Path) -> dict[tuple[str, str], str]:
    """(subject, sample id) -> the apex crop HTNet publishes for it (``apex/<imagename>``), from its CSV.

    Raises:
        DatasetError: the folder has no such CSV.
    """
    table = Path(apex) / HTNET_APEX_CSV
    if not table.is_file():
        raise DatasetError(f"{table} not found: apex must be HTNet's folder of apex crops (../shared/data/htnet_apex)")
    df = pd.read_csv(table, dtype=str, keep_default_na=False)
    return {(r.sub, r.filename_o): str(Path(apex).resolve() / r.imagename) for r in df.itertuples(index=False)}


def megc2019(root: Path, annotations: Path | None = None, source: str | None = None,
             apex: str | Path | None = None) -> AdapterResult:
    """The MEGC2019 composite as STSTNet/HTNet publish it (:mod:`preprocess.megc2019`): the flow
    stages are skipped; ``flow_path`` names each sample's 28 x 28 u/v/strain image. Only CDE labels.

    With ``source`` (``smic``, ``casme2`` or ``samm``), only that source dataset's samples, as an SDE dataset
    in the composite's three classes (SMIC-HS: 164 samples, 16 subjects, the paper's SMIC SDE set with our
    flows; CASME II 145 and SAMM 133, NOT the paper's 5-class rows). The result says which composite it is
    cut from (``subset_of``), so that a search's choices made on the composite replay on its subjects.

    With ``apex`` (HTNet's folder of the samples' apex crops, ``../shared/data/htnet_apex``), each sample's
    ``apex_path`` names its crop: the grid finds HTNet's landmarks there once (:mod:`preprocess.landmarks`).

    Raises:
        DatasetError: no ``combined_3class_gt.csv`` in the root, an unknown ``source``, or an ``apex`` folder
            without HTNet's table or without a crop of some sample.
    """
    try:
        gt = read_ground_truth(root)
    except (FileNotFoundError, ValueError) as e:
        raise DatasetError(str(e)) from e
    if source is not None:
        if source not in MEGC2019_SOURCES:
            raise DatasetError(f"megc2019 source must be one of {MEGC2019_SOURCES}, got {source!r}")
        gt = gt[gt["dataset"] == source]
    crops = htnet_apex_paths(Path(apex)) if apex else {}
    missing = [f"{s}/{i}" for s, i in zip(gt["subject"], gt["sample_id"]) if apex and (s, i) not in crops]
    if missing:
        raise DatasetError(f"{apex}: no apex crop of {len(missing)} sample(s), e.g. {missing[:3]}")
    results = []
    for ds, part in gt.groupby("dataset", sort=False):
        rows = [dict(subject=r.subject, sample_id=r.sample_id, emotion=r.emotion,
                     sde_class=r.emotion if source else None, cde_class=None if source else r.emotion,
                     flow_path=r.flow_path, apex_path=crops.get((r.subject, r.sample_id)) if apex else None)
                for r in part.itertuples(index=False)]
        results.append(_finish(ds, rows, CDE_CLASSES if source else ()))
    samples = pd.concat([r.samples for r in results], ignore_index=True)
    rejects = pd.concat([r.rejects for r in results], ignore_index=True)
    if source:
        return AdapterResult(samples, rejects, {"sde": list(CDE_CLASSES), "cde": []}, subset_of="megc2019/CDE")
    return AdapterResult(samples, rejects, {"sde": [], "cde": list(CDE_CLASSES)})


def dataset_name(fmt: str, adapted: AdapterResult, name: str | None = None) -> str:
    """The output folder name of an adapted dataset: ``name`` when given, else a manifest's file stem
    (its samples' ``dataset``), else the format (``casme2``, ``megc2019``, ...)."""
    if name:
        return name
    if fmt == "manifest" and len(adapted.samples):
        return str(adapted.samples["dataset"].iloc[0])
    if adapted.subset_of:  # a source dataset of the composite: megc2019-smic, ...
        return f"{fmt}-{adapted.samples['dataset'].iloc[0]}"
    return fmt


# --- a lab's own data: manifest CSV ------------------------------------------------------------

MANIFEST_COLUMNS = ["subject", "sample_id", "onset_path", "apex_path", "label"]


def check_inferred_classes(df: pd.DataFrame, path: Path) -> None:
    """Refuse a manifest whose inferred classes include one that only one subject has: LOSO cannot learn it
    for that subject's fold (no training sample), and such a label is almost always a typo.

    Args:
        df: the manifest as read (columns ``subject``, ``label``; row i is CSV line i + 2).
        path: the CSV, for the message.

    Raises:
        DatasetError: naming each such label, its subject and its CSV lines, and how to keep it.
    """
    labelled = df.assign(label=df["label"].str.strip(), subject=df["subject"].str.strip())
    labelled = labelled[labelled["label"] != ""]
    problems = []
    for label, g in labelled.groupby("label"):
        if g["subject"].nunique() == 1:
            lines = ", ".join(str(i + 2) for i in g.index[:10]) + (" ..." if len(g) > 10 else "")
            problems.append(f"class {label!r} is held by one subject only ({g['subject'].iloc[0]}; CSV line(s) {lines})")
    if problems:
        listed = ",".join(sorted(labelled["label"].unique()))
        raise DatasetError(f"manifest {path}: " + "; ".join(problems) + ". LOSO cannot learn such a class for that "
                           "subject's fold, and it is most often a typo: correct the label, or list the classes to "
                           f"keep it (--classes {listed})")


def manifest(root: Path, annotations: Path | None = None, precropped: bool = False,
             classes: list[str] | None = None) -> AdapterResult:
    """A manifest CSV for a new dataset: header ``subject,sample_id,onset_path,apex_path,label``.

    ``label`` is a class name; the SDE label index follows ``classes`` when given, else the class
    names in sorted order. Paths are absolute or relative to the CSV's folder. Extra columns are kept,
    as JSON, in ``meta``. The dataset name is the CSV's file stem.

    Raises:
        DatasetError: the CSV is missing, unreadable or lacks a required column.
    """
    path = Path(root).resolve()  # resolved: the shard cache key must not depend on how the path is spelled
    if not path.is_file():
        raise DatasetError(f"manifest {path} not found (--root must name the CSV file)")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # any parse failure is a wrong root
        raise DatasetError(f"cannot read manifest {path}: {e}") from e
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise DatasetError(f"manifest {path} lacks column(s) {missing}; header must include {','.join(MANIFEST_COLUMNS)}")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem)
    labels = sorted({v.strip() for v in df["label"] if v.strip()})
    if classes:
        labels = list(classes)
    else:  # inferred from the data: a class that one subject alone holds is refused (almost always a typo)
        check_inferred_classes(df, path)
    extra = [c for c in df.columns if c not in MANIFEST_COLUMNS]

    def resolve(p: str) -> str:
        q = Path(p.strip())
        return str((q if q.is_absolute() else (path.parent / q)).resolve())

    rows = []
    for r in df.to_dict("records"):
        label = r["label"].strip()
        row = dict(subject=r["subject"].strip(), sample_id=r["sample_id"].strip())
        if not row["subject"] or not row["sample_id"]:
            rows.append(dict(row, reject=("missing_field", "empty subject or sample_id")))
            continue
        if not label:
            rows.append(dict(row, reject=("missing_label", "empty label")))
            continue
        rows.append(dict(
            row, emotion=label, sde_class=label if label in labels else None, cde_class=None,
            onset_path=resolve(r["onset_path"]), apex_path=resolve(r["apex_path"]),
            precropped=precropped, meta=json.dumps({c: r[c] for c in extra}) if extra else "",
        ))
    return _finish(name, rows, tuple(labels))


ADAPTERS = {"casme2": casme2, "samm": samm, "smic": smic, "casme3": casme3, "megc2019": megc2019, "manifest": manifest}
