"""The streaming client CLI against the real server, and when the server is down."""

import numpy as np
import pytest
from PIL import Image

from devtools.processes import free_port
from flux_triton.clients import stream_client


def test_client_saves_previews_and_image(served, tmp_path, capsys):
    code = stream_client.main(["--url", served["schnell"].url, "--prompt", "a red circle",
                               "--prompt", "a cat", "--steps", "3", "--height", "64", "--width", "96",
                               "--seed", "4", "--out", str(tmp_path), "--show", "always"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "3 steps streamed in 5 responses" in out and "seed 4" in out
    assert "step 3/3" in out and "\x1b[38;2;" in out  # progress and a terminal thumbnail
    image = np.asarray(Image.open(tmp_path / "image_1.png"))
    assert image.shape == (64, 96, 3)
    previews = sorted(p.name for p in tmp_path.glob("preview_step*.png"))
    assert previews == [f"preview_step{s:02d}_{b}.png" for s in (1, 2, 3) for b in (0, 1)]
    assert np.asarray(Image.open(tmp_path / "preview_step03_0.png")).shape == (8, 12, 3)


def test_client_reports_server_errors(served, tmp_path, capsys):
    code = stream_client.main(["--url", served["schnell"].url, "--prompt", "a cat",
                               "--height", "100", "--out", str(tmp_path)])
    assert code == 1
    assert "`height`: must be a multiple of 16" in capsys.readouterr().err


def test_client_says_when_server_is_down(tmp_path, capsys):
    code = stream_client.main(["--url", f"127.0.0.1:{free_port()}", "--prompt", "a cat",
                               "--out", str(tmp_path)])
    assert code == 2
    assert "cannot reach Triton" in capsys.readouterr().err


def test_client_without_previews(served, tmp_path, capsys):
    code = stream_client.main(["--url", served["schnell"].url, "--prompt", "a cat", "--steps", "2",
                               "--height", "64", "--width", "64", "--no-previews", "--out", str(tmp_path)])
    assert code == 0 and "2 steps streamed in 4 responses" in capsys.readouterr().out
    assert not list(tmp_path.glob("preview_step*.png")) and (tmp_path / "image_0.png").exists()


@pytest.mark.fast
@pytest.mark.parametrize("field, value", [
    ("num_inference_steps", 4294967298), ("height", 2**31), ("seed", 2**63),
    ("deadline_ms", -(2**31) - 1), ("width", 99999999999999999999), ("steps_as_float", 2.5),
    ("guidance_scale", 1e39)])
def test_numbers_are_checked_before_they_become_fixed_width(field, value):
    """A value its declared type cannot hold is refused naming the field and quoting the value,
    never wrapped (2**32 + 2 steps used to arrive as 2)."""
    name = "num_inference_steps" if field == "steps_as_float" else field
    with pytest.raises(ValueError) as error:
        stream_client.build_inputs(prompt="a", **{name: value})
    assert f"`{name}`" in str(error.value) and repr(value) in str(error.value)


@pytest.mark.fast
def test_edge_values_and_non_finite_floats_pass_through():
    built = {t.name(): t for t in stream_client.build_inputs(
        prompt="a", num_inference_steps=2**31 - 1, seed=2**63 - 1, guidance_scale=float("nan"))}
    assert set(built) == {"prompt", "num_inference_steps", "seed", "guidance_scale"}


@pytest.mark.fast
def test_client_refuses_a_number_that_would_wrap(tmp_path, capsys):
    code = stream_client.main(["--url", f"127.0.0.1:{free_port()}", "--prompt", "a cat",
                               "--steps", "99999999999999999999", "--out", str(tmp_path)])
    assert code == 2
    assert "`num_inference_steps`" in capsys.readouterr().err
