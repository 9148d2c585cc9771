"""The pure parts of the edit study: caption rewriting, the background mask, scoring on renders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from devtools.shapes import PALETTE, SHAPES, all_scenes, render
from devtools.shapes_edits import (
    CRITERIA,
    background_edit,
    background_mask,
    dilate,
    score,
    shape_edit,
)

pytestmark = pytest.mark.fast  # unit tests: no model
SIZE, CELL = 128, 8


def test_edits_change_one_field_to_a_valid_value():
    for scene in all_scenes():
        new_shape, new_background = shape_edit(scene), background_edit(scene)
        assert new_shape.shape != scene.shape and new_shape.shape in SHAPES
        assert (new_shape.colour, new_shape.background) == (scene.colour, scene.background)
        assert new_background.background not in (scene.background, scene.colour)
        assert new_background.background in PALETTE
        assert (new_background.shape, new_background.colour) == (scene.shape, scene.colour)
    assert shape_edit(all_scenes()[0]).caption == "a red square on a green background"


def test_dilate_grows_by_the_radius():
    mask = np.zeros((9, 9), bool)
    mask[4, 4] = True
    grown = dilate(mask, 2)
    assert grown.sum() == 25 and grown[2:7, 2:7].all()


def test_background_mask_repaints_background_cells_only():
    generator = torch.Generator().manual_seed(3)
    for scene in all_scenes()[::7]:
        image = render(scene, SIZE, generator)
        shape = np.any(image != np.array(PALETTE[scene.background], np.uint8), axis=-1)
        mask = background_mask(image, CELL, "grown")
        assert set(np.unique(mask)) == {0, 255}
        assert not (mask[shape] == 255).any(), f"{scene.caption}: the mask covers the shape"
        cells = mask.reshape(SIZE // CELL, CELL, SIZE // CELL, CELL)
        assert (cells == cells[:, :1, :, :1]).all(), "the mask is not whole latent cells"
        assert (mask == 255).sum() > 0.6 * (~shape).sum(), f"{scene.caption}: too little background"
        pixel_mask = background_mask(image, CELL, "pixel")
        assert not (pixel_mask[shape] == 255).any() and (pixel_mask >= mask).all()
        inside = background_mask(image, CELL, "inside")
        kept = inside == 0
        assert kept.any() and shape[kept].all(), f"{scene.caption}: keeps pixels off the shape"
        cells = inside.reshape(SIZE // CELL, CELL, SIZE // CELL, CELL)
        assert (cells == cells[:, :1, :, :1]).all() and (inside >= mask).all()
    with pytest.raises(ValueError, match="inside"):
        background_mask(image, CELL, "outline")


@pytest.mark.parametrize("task, edit", [("img2img", shape_edit), ("inpaint", background_edit)])
def test_score_passes_the_edited_scene_and_fails_the_source(task, edit):
    generator = torch.Generator().manual_seed(5)
    scenes = all_scenes()[::11]
    edited = [edit(scene) for scene in scenes]
    wanted = [render(scene, SIZE, generator) for scene in edited]
    unchanged = [render(scene, SIZE, generator) for scene in scenes]
    assert score(wanted, edited, CRITERIA[task])["rates"]["all"] == 1.0
    failed = score(unchanged, edited, CRITERIA[task])
    assert failed["counts"]["all"] == 0 and failed["counts"][CRITERIA[task][0]] == 0
    assert failed["rates"][CRITERIA[task][1]] == 1.0  # what stays does stay
