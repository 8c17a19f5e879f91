"""Dataset adapters on the REAL annotation sheets in ../shared/data/annotations."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from preprocess.adapters import DatasetError, casme2, casme3, dataset_name, manifest, megc2019, samm, smic

from .conftest import ANNOTATIONS, COMPOSITE


@pytest.fixture(scope="module")
def sheets():
    if not (ANNOTATIONS / "SAMM_Micro_FACS_Codes_v2.xlsx").is_file():
        pytest.skip(f"real annotation sheets absent: {ANNOTATIONS} not found (set EPIR_SHARED_DATA)")
    return ANNOTATIONS


@pytest.fixture(scope="module")
def composite_gt():
    if not (COMPOSITE / "combined_3class_gt.csv").is_file():
        pytest.skip(f"real MEGC2019 composite absent: {COMPOSITE}")
    gt = pd.read_csv(COMPOSITE / "combined_3class_gt.csv", header=None, names=["dataset", "subject", "sample_id", "label"])
    gt["subject"] = [str(s).zfill(3) if d == "samm" else str(s) for d, s in zip(gt["dataset"], gt["subject"])]
    return gt


def _cde_set(samples):
    c = samples.dropna(subset=["cde_label"])
    return set(zip(c["subject"], c["sample_id"], c["cde_label"].astype(int)))


@pytest.mark.parametrize("sheet", ["CASME2-coding-20140508.xlsx", "CASME2-coding-20190701.xlsx"])
def test_casme2_maps_exactly_the_composite(tmp_path, sheets, composite_gt, sheet):
    (tmp_path / "CASME2_RAW_selected").mkdir()
    r = casme2(tmp_path, sheets / sheet)
    g = composite_gt[composite_gt.dataset == "casme2"]
    assert _cde_set(r.samples) == set(zip(g["subject"], g["sample_id"], g["label"]))
    assert len(_cde_set(r.samples)) == 145
    # sadness / fear are in no mapping: rejected with a reason, not silently dropped
    assert set(r.rejects["reason"]) == {"label_outside_mapping"} and len(r.samples) + len(r.rejects) == 255
    assert r.samples["sde_class"].notna().all()
    row = r.samples[(r.samples.subject == "sub01") & (r.samples.sample_id == "EP02_01f")].iloc[0]
    assert row["onset_path"].endswith("CASME2_RAW_selected/sub01/EP02_01f/img46.jpg") and row["apex_frame"] == 59
    if "2019" in sheet:  # its '/' apex gets the stated rule, and is reported
        row = r.samples[(r.samples.subject == "sub04") & (r.samples.sample_id == "EP12_01f")].iloc[0]
        assert row["apex_frame"] == (261 + 321) // 2 and "not a number" in row["note"]
        assert (r.samples["sde_class"] == "surprise").sum() == 28


def test_casme2_cropped_release_is_precropped(tmp_path, sheets):
    (tmp_path / "Cropped").mkdir()
    r = casme2(tmp_path, sheets / "CASME2-coding-20140508.xlsx")
    assert r.samples["precropped"].all()
    assert r.samples["onset_path"].iloc[0].endswith("Cropped/sub01/EP02_01f/reg_img46.jpg")


def test_samm_maps_exactly_the_composite_and_repairs_bad_apexes(tmp_path, sheets, composite_gt):
    (tmp_path / "SAMM" / "006").mkdir(parents=True)
    r = samm(tmp_path, sheets / "SAMM_Micro_FACS_Codes_v2.xlsx")
    g = composite_gt[composite_gt.dataset == "samm"]
    assert _cde_set(r.samples) == set(zip(g["subject"], g["sample_id"], g["label"])) and len(g) == 133
    assert len(r.samples) == 159 and r.samples["sde_label"].notna().sum() == 136  # SDE: 5 classes
    notes = r.samples.set_index("sample_id")["note"]
    assert "outside onset..offset" in notes["032_3_1"] and "outside onset..offset" in notes["028_4_1"]
    a = r.samples.set_index("sample_id").loc["032_3_1"]
    assert a["apex_frame"] == (4896 + 4970) // 2
    assert a["apex_path"].endswith(f"SAMM/032/032_3_1/032_{(4896 + 4970) // 2:05d}.jpg")


def test_casme3_three_classes(tmp_path, sheets):
    (tmp_path / "part_A").mkdir()
    r = casme3(tmp_path, sheets / "cas(me)3_part_A_ME_label_JpgIndex_v2.xlsx")
    raw = pd.read_excel(sheets / "cas(me)3_part_A_ME_label_JpgIndex_v2.xlsx")
    emo = raw["emotion"].str.strip().str.lower()
    assert len(r.samples) == emo.isin(["happy", "surprise", "disgust", "fear", "anger", "sad"]).sum()
    assert len(r.samples) + len(r.rejects) == len(raw) and r.samples["sample_id"].is_unique
    assert (r.samples["sde_class"] == "positive").sum() == (emo == "happy").sum()
    assert r.samples["cde_label"].isna().all()


def test_smic_labels_from_folders_and_apex_from_the_list(tmp_path, sheets):
    lst = pd.read_excel(sheets / "smic_apex.xlsx")
    row = lst[lst["clip"] == "s3_ne_03"].iloc[0]
    clip = tmp_path / "HS" / "s3" / "micro" / "negative" / "s3_ne_03"
    clip.mkdir(parents=True)
    for n in range(int(row.onset_frame), int(row.onset_frame) + 12):
        (clip / f"image{n}.bmp").write_bytes(b"")
    other = tmp_path / "HS" / "s3" / "micro" / "surprise" / "s3_sur_99"  # not in the list
    other.mkdir(parents=True)
    for n in (5, 6, 7, 8, 9):
        (other / f"image{n}.bmp").write_bytes(b"")
    r = smic(tmp_path, sheets / "smic_apex.xlsx")
    s = r.samples.set_index("sample_id")
    assert list(s.index) == ["s03_ne_03", "s03_sur_99"] and (s["subject"] == "s03").all()
    assert s.loc["s03_ne_03", "apex_frame"] == row.apex_frame and s.loc["s03_ne_03", "cde_class"] == "negative"
    assert s.loc["s03_ne_03", "onset_path"].endswith(f"image{int(row.onset_frame)}.bmp")
    assert s.loc["s03_sur_99", "apex_frame"] == 7 and "middle frame" in s.loc["s03_sur_99", "note"]


def test_megc2019_composite_adapter():
    if not (COMPOSITE / "combined_3class_gt.csv").is_file():
        pytest.skip(f"real MEGC2019 composite absent: {COMPOSITE}")
    r = megc2019(COMPOSITE)
    s = r.samples
    assert len(s) == 442 and s["subject"].nunique() == 68
    assert s["cde_label"].value_counts().to_dict() == {0: 250, 1: 109, 2: 83}
    assert s.groupby("dataset")["subject"].nunique().to_dict() == {"casme2": 24, "samm": 28, "smic": 16}
    # each source dataset alone, as an SDE dataset in the composite's three classes (SMIC-HS: EPIR Tables 2-3)
    for source, n, subjects in (("smic", 164, 16), ("casme2", 145, 24), ("samm", 133, 28)):
        part = megc2019(COMPOSITE, source=source)
        assert (len(part.samples), part.samples["subject"].nunique()) == (n, subjects)
        assert part.samples["cde_label"].isna().all() and part.samples["sde_label"].notna().all()
        assert part.classes == {"sde": ["negative", "positive", "surprise"], "cde": []}
        assert part.subset_of == "megc2019/CDE" and dataset_name("megc2019", part) == f"megc2019-{source}"
    with pytest.raises(DatasetError, match="source must be one of"):
        megc2019(COMPOSITE, source="casme3")


def test_wrong_roots_raise_dataset_errors(tmp_path):
    for fn in (casme2, samm, smic, casme3, megc2019):
        with pytest.raises(DatasetError):
            fn(tmp_path)
    bad = tmp_path / "m.csv"
    bad.write_text("subject,onset_path\nA,x.png\n")
    with pytest.raises(DatasetError, match="lacks column"):
        manifest(bad)


def test_unrepairable_apex_is_rejected_not_a_crash(tmp_path):
    (tmp_path / "CASME2_RAW_selected").mkdir()
    pd.DataFrame({"Subject": [1, 1], "Filename": ["EP01", "EP02"], "OnsetFrame": [10, 10], "ApexFrame": ["/", 14],
                  "OffsetFrame": [0, 0], "Estimated Emotion": ["happiness", "disgust"]}
                 ).to_excel(tmp_path / "CASME2-coding-x.xlsx", index=False)
    r = casme2(tmp_path)
    assert r.samples["sample_id"].tolist() == ["EP02"]
    assert r.rejects[["sample_id", "reason"]].values.tolist() == [["EP01", "bad_annotation"]]


def test_htnet_apex_crops_give_landmarks_kept_with_the_shards(tmp_path):
    """Each composite sample's apex crop (HTNet's folder), its five landmarks found at 28 x 28 px as HTNet finds them
    (here 4 samples: SAMM crops give a face, most CASME II crops do not and take HTNet's fallback points), kept in
    landmarks.csv and reused while the samples are the same."""
    from preprocess.landmarks import FALLBACK_LANDMARKS, landmark_array, read_landmarks, write_landmarks

    apex = COMPOSITE.parent / "htnet_apex"
    if not (apex / "combined_3_class2_for_optical_flow.csv").is_file():
        pytest.skip(f"HTNet's apex crops absent: {apex}")
    r = megc2019(COMPOSITE, apex=apex)
    assert r.samples["apex_path"].map(lambda p: Path(p).is_file()).all() and len(r.samples) == 442
    some = r.samples[r.samples["sample_id"].isin(["006_1_2", "006_1_3", "EP02_01f", "EP19_05f"])
                     & r.samples["subject"].isin(["006", "sub01"])]
    lines = []
    write_landmarks(tmp_path, some, lines.append)
    table = read_landmarks(tmp_path)
    assert table["found"].tolist() == [s.startswith("006") for s in table["sample_id"]], table
    points = landmark_array(table)
    assert (points[~table["found"].to_numpy()] == FALLBACK_LANDMARKS).all()
    assert ((points > 0) & (points < 28)).all() and "found a face on 2 of 4" in lines[0]
    write_landmarks(tmp_path, some, lines.append)
    assert "kept from an earlier run" in lines[-1]
    with pytest.raises(DatasetError, match="not found"):
        megc2019(COMPOSITE, apex=tmp_path)
