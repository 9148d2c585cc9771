"""FLUX.2 served by tritonserver: the same `flux_bls` interface, the image and every streamed
preview bit-equal to diffusers' Flux2KleinPipeline and Flux2Pipeline."""

import numpy as np
import pytest

from tests.reference import assert_served_matches_diffusers, served_generate

CASES = {
    "2 prompts x 2 images, 64x96": dict(prompt=["a red circle on blue", "two green squares"],
                                        num_images_per_prompt=2, height=64, width=96, seed=7),
    "default size, custom sigmas": dict(prompt="a horse", sigmas=[1.0, 0.6, 0.2], seed=3),
}


def _references() -> np.ndarray:
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)
    return np.ascontiguousarray(blocks.repeat(14, axis=1).repeat(17, axis=2))  # 70 x 102


CASES["2 reference images, 2 prompts"] = dict(prompt=["make it red", "make it blue"],
                                              image=_references(), seed=5)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("variant", ["klein", "dev"])
def test_flux2_served_identical_to_diffusers(served_flux2, flux2_pipes, variant, case):
    assert_served_matches_diffusers(served_flux2[variant], flux2_pipes[variant], CASES[case],
                                    f"flux2-{variant} {case}")


def test_flux2_served_refuses_a_flux1_field_naming_it(served_flux2):
    result = served_generate(served_flux2["klein"], dict(prompt="a cat", prompt_2="a dog"))
    assert result.error is not None and "prompt_2" in result.error and "FLUX.2" in result.error
    assert result.image is None


def test_flux2_served_x0_previews(served_flux2):
    result = served_generate(served_flux2["dev"], dict(prompt="a cat", preview_kind="x0",
                                                       height=32, width=32, seed=1))
    assert result.error is None
    info = served_flux2["dev"].info
    shapes = {np.asarray(step["preview_x0"]).shape for step in result.steps}
    assert shapes == {(1, info.latent_channels * 4, 2, 2)}


def test_flux2_through_the_gateway_unchanged(served_flux2):
    """OpenAI's generation request and the streamed previews (x0, decoded by the server's FLUX.2
    VAE at full size) work on a FLUX.2 server as on a FLUX.1 one; the image is the served one."""
    import json

    from flux_triton.gateway.app import GatewaySettings
    from tests.gateway_server import RunningGateway, b64_image, sse_events

    served = served_flux2["klein"]
    with RunningGateway(GatewaySettings(triton_url=served.url)) as gateway:
        status, body, _ = gateway.post("/v1/images/generations",
                                       {"prompt": "a cat", "size": "96x64", "seed": 4})
        assert status == 200, body
        expected = served_generate(served, dict(prompt="a cat", width=96, height=64, seed=4))
        assert np.array_equal(b64_image(body["data"][0]["b64_json"]), expected.image[0])
        connection = gateway.connection()
        connection.request("POST", "/v1/images/generations", headers={"Content-Type": "application/json"},
                           body=json.dumps({"prompt": "a cat", "size": "96x64", "seed": 4,
                                            "stream": True, "steps": 3}))
        events = list(sse_events(connection.getresponse()))
        connection.close()
        assert [name for name, _, _ in events] == ["image_generation.partial_image"] * 3 + [
            "image_generation.completed"]
        assert b64_image(events[0][1]["b64_json"]).shape == (64, 96, 3)
        status, body, _ = gateway.post("/v1/images/generations",
                                       {"prompt": "a cat", "negative_prompt": "a dog"})
        assert status == 400 and "negative_prompt" in json.dumps(body) and "FLUX.2" in json.dumps(body)
        # an edit: the uploaded picture is FLUX.2's reference image (its size: 70 x 102 -> 64 x 96)
        from tests.test_gateway_edits import png

        picture = _references()[0]
        status, body, _ = gateway.post_form("/v1/images/edits", {"prompt": "make it red", "seed": "6"},
                                            [("image", "a.png", png(picture))])
        assert status == 200, body
        expected = served_generate(served, dict(prompt="make it red", seed=6, image=picture[None]))
        assert expected.error is None and expected.image.shape == (1, 64, 96, 3)
        assert np.array_equal(b64_image(body["data"][0]["b64_json"]), expected.image[0])
        status, body, _ = gateway.post_form("/v1/images/edits",
                                            {"prompt": "x", "image_role": "init"},
                                            [("image", "a.png", png(picture))])
        assert status == 400 and "image_role" in json.dumps(body)


def test_flux2_served_from_onnx_graphs(flux2_dirs, flux2_pipes, tmp_path_factory):
    """BACKEND=onnx: each FLUX.2 network exported to ONNX (its parity checked at export) and run
    by onnxruntime; the image within one uint8 level of diffusers'."""
    from tests.conftest import _serve_variants

    fields = dict(prompt=["a red circle", "a cat"], height=48, width=64, seed=2,
                  image=_references()[:1])
    for servers in _serve_variants(flux2_dirs, tmp_path_factory, "onnx", ("klein",)):
        result = served_generate(servers["klein"], fields)
        assert result.error is None, result.error
        from flux_triton.request import validate_request
        from tests.reference import diffusers_image, raw_inputs

        expected, _, _ = diffusers_image(flux2_pipes["klein"],
                                         validate_request(raw_inputs(**fields), servers["klein"].info))
        assert np.abs(result.image.astype(int) - expected.astype(int)).max() <= 1
