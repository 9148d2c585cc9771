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


def test_client_fast_tier_says_what_it_skipped(served, tmp_path, capsys):
    from tests.reference import served_generate

    args = ["--url", served["schnell"].url, "--prompt", "a red circle", "--steps", "8", "--height",
            "64", "--width", "64", "--seed", "3", "--cache-threshold", "0.5", "--out", str(tmp_path)]
    code = stream_client.main(args)
    out = capsys.readouterr().out
    assert code == 0, out
    expected = served_generate(served["schnell"], dict(
        prompt="a red circle", num_inference_steps=8, height=64, width=64, seed=3,
        cache_threshold=0.5))
    report = expected.timings["first_block_cache"]
    assert report["dit_calls_skipped"] > 0
    assert (f"first-block cache at 0.5: {report['dit_calls_skipped']} of 8 DiT calls ran only "
            "the first block") in out
    assert np.array_equal(np.asarray(Image.open(tmp_path / "image_0.png")), expected.image[0])


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


def test_client_edits_an_image_with_a_mask(served, tmp_path, capsys):
    """--image/--mask/--strength send what the gateway would: the image equals the request made
    with the decoded arrays, the mask read by the shared conventions (an RGBA mask: transparent =
    repaint)."""
    from tests.reference import served_generate

    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    mask = np.zeros((64, 80), np.uint8)
    mask[16:48, 8:40] = 255
    Image.fromarray(source).save(tmp_path / "in.png")
    Image.fromarray(np.dstack([np.zeros((64, 80, 3), np.uint8), 255 - mask])).save(tmp_path / "mask.png")
    code = stream_client.main(["--url", served["schnell"].url, "--prompt", "a cat", "--steps", "4",
                               "--seed", "3", "--image", str(tmp_path / "in.png"), "--mask",
                               str(tmp_path / "mask.png"), "--strength", "0.8", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "4 steps streamed" in out  # int(4 - 4 × 0.8) = 0: every step runs
    expected = served_generate(served["schnell"], dict(prompt="a cat", num_inference_steps=4, seed=3,
                                                       image=source, mask=mask, strength=0.8))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "image_0.png")), expected.image[0])


def test_client_refuses_bad_image_arguments(served, tmp_path, capsys):
    (tmp_path / "not.png").write_bytes(b"hello")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "in.png")
    Image.fromarray(np.zeros((32, 64), np.uint8)).save(tmp_path / "small.png")
    url = served["schnell"].url
    for args, text in ((["--image", str(tmp_path / "not.png")], "`image`: is not an image"),
                       (["--image", str(tmp_path / "missing.png")], "`image`: cannot read"),
                       (["--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "small.png")],
                        "`mask`: must have the image's size 64 x 64")):
        code = stream_client.main(["--url", url, "--prompt", "a", "--out", str(tmp_path), *args])
        assert code == 2 and text in capsys.readouterr().err, args
    code = stream_client.main(["--url", url, "--prompt", "a", "--out", str(tmp_path), "--image",
                               str(tmp_path / "in.png"), "--image-role", "reference"])
    assert code == 1 and "`image_role`" in capsys.readouterr().err  # not a Kontext model
    with pytest.raises(SystemExit):
        stream_client.main(["--prompt", "a", "--mask", str(tmp_path / "in.png")])
    assert "give --image too" in capsys.readouterr().err
