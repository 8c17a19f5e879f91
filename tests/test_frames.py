"""Face and flow stages on a real photograph, and optical strain against an analytic field."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from preprocess.demo import base_photo, warp
from preprocess.frames import FlowConfig, SampleError, face_box_from_detections, flow_features, optical_strain
from preprocess.pipeline import FaceStage, PreprocessConfig


def test_strain_matches_an_analytic_linear_flow():
    a, b, c, d = 0.02, 0.05, -0.01, 0.03  # u = a x + b y, v = c x + d y
    yy, xx = np.mgrid[0:20, 0:30].astype(np.float64)
    u, v = a * xx + b * yy, c * xx + d * yy
    expected = np.sqrt(a**2 + d**2 + 0.5 * (b + c) ** 2)
    np.testing.assert_allclose(optical_strain(u, v), expected, rtol=1e-6)
    # the widespread snippet (axes swapped, 0.25 on the shear) gives something else here
    wrong = np.sqrt(b**2 + c**2 + 0.25 * (a + d) ** 2)
    assert abs(wrong - expected) > 1e-3


def test_largest_face_wins_and_box_is_square_with_margin():
    boxes = np.array([[10, 10, 30, 30], [50, 40, 150, 160]])
    x1, y1, x2, y2 = face_box_from_detections(boxes, (400, 400), margin=0.1)
    assert (x2 - x1) == (y2 - y1) == round(120 * 1.2)
    assert abs((x1 + x2) / 2 - 100) <= 1 and abs((y1 + y2) / 2 - 100) <= 1
    with pytest.raises(SampleError, match="no_face"):
        face_box_from_detections(None, (400, 400), 0.1)


@pytest.fixture(scope="module")
def face_stage():
    return FaceStage(dataclasses.asdict(PreprocessConfig(normalize="none")))


def _pair(tmp_path, dx_px, dy_px):
    img = base_photo()
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    blob = np.exp(-((xx - w / 2) ** 2 + (yy - 0.45 * h) ** 2) / (2 * (0.2 * w) ** 2))  # the face moves, not the frame
    apex = warp(img, dx_px * blob, dy_px * blob)
    paths = []
    for name, im in (("onset.png", img), ("apex.png", apex)):
        cv2.imwrite(str(tmp_path / name), cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
        paths.append(str(tmp_path / name))
    return paths


@pytest.mark.parametrize("dx,dy", [(1.5, 0.0), (0.0, -1.5)])
def test_face_found_and_flow_points_the_way_the_warp_moved(tmp_path, face_stage, dx, dy):
    onset, apex = _pair(tmp_path, dx, dy)
    r = face_stage._one({"onset_path": onset, "apex_path": apex, "precropped": False})
    assert r["face_source"] == "mtcnn"
    x1, y1, x2, y2 = r["face_box"]
    # Grace Hopper's face lies around the middle of the upper half of the photograph
    w = base_photo().shape[1]
    assert x1 < w / 2 < x2 and 40 < (x2 - x1) < 160
    flow, _, _ = flow_features(r["onset_face"], r["apex_face"], FlowConfig(normalize="none"))
    centre = flow[9:19, 9:19]  # the middle of the face, in working-size pixels
    expected = np.array([dx, dy]) * r["px_scale"]
    u, v = centre[..., 0].mean(), centre[..., 1].mean()
    main, other = (u, v) if dx else (v, u)
    assert np.sign(main) == np.sign(dx or dy) and abs(main) > 0.4 * abs(expected).max()
    assert abs(other) < 0.25 * abs(main)


def test_no_face_and_size_mismatch_are_sample_errors(tmp_path, face_stage):
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((200, 200, 3), 127, np.uint8))
    with pytest.raises(SampleError) as e:
        face_stage._one({"onset_path": str(blank), "apex_path": str(blank), "precropped": False})
    assert e.value.reason == "no_face"
    small = tmp_path / "small.png"
    cv2.imwrite(str(small), np.full((100, 200), 127, np.uint8))
    with pytest.raises(SampleError) as e:
        face_stage._one({"onset_path": str(blank), "apex_path": str(small), "precropped": True})
    assert e.value.reason == "size_mismatch"
    # a pre-cropped frame (no context for MTCNN) uses the whole frame as the face
    r = face_stage._one({"onset_path": str(blank), "apex_path": str(blank), "precropped": True})
    assert r["face_source"] == "precropped" and tuple(r["face_box"]) == (0, 0, 200, 200)
