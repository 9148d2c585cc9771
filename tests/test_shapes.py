"""The shapes world and its pixel classifier, checked on ground-truth renders first."""

import numpy as np
import pytest

from devtools.shapes import all_scenes, classifier_check, classify

pytestmark = pytest.mark.fast  # unit tests: no server


def test_world_has_168_captions():
    scenes = all_scenes()
    assert len(scenes) == len({s.caption for s in scenes}) == 168
    assert scenes[0].caption == "a red circle on a green background"


@pytest.mark.parametrize("outline", [False, True])
@pytest.mark.parametrize("size", [64, 96, 128])
def test_classifier_reads_ground_truth(size, outline):
    """Filled shapes and outlines (what the `outline` adapter teaches) are read back, outline or not."""
    scores = classifier_check(size, copies=2, outline=outline)
    print(f"\nclassifier on {2 * len(all_scenes())} ground-truth renders at {size}px: {scores}")
    assert scores["colour"] == scores["background"] == scores["outline"] == 1.0
    assert scores["shape"] >= 0.99


def test_classifier_rejects_a_blank_image():
    assert classify(np.full((64, 64, 3), 128, dtype=np.uint8)) is None
