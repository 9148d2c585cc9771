"""Batching DiT calls across concurrent requests (BATCH_DELAY_US): the batcher itself, the BLS with
it on (in-process, through the pb_utils stand-in), and a real server with it on."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from flux_triton.batching import CallBatcher
from tests import python_backend_stub as pb
from tests.reference import inject, metric, served_generate

BATCHED = {"x", "t"}


def _double(calls: list):
    async def call(inputs, _context=None):
        calls.append({k: v.clone() for k, v in inputs.items()})
        await asyncio.sleep(0.001)
        return {"y": inputs["x"] * 2 + inputs["t"][:, None] + inputs["shared"].sum()}
    return call


def _recorded(batcher_class, call, batched, **options):
    """A batcher that records the rows of every call it runs, and that list."""
    sizes: list[int] = []
    return batcher_class(call, batched, on_batch=lambda rows, _calls: sizes.append(rows), **options), sizes


def _inputs(rows: int, fill: float, width: int = 3, shared: float = 1.0) -> dict:
    return {"x": torch.full((rows, width), fill), "t": torch.full((rows,), fill),
            "shared": torch.full((2,), shared)}


@pytest.mark.fast
def test_concurrent_calls_become_one_and_each_gets_its_rows():
    calls = []
    batcher, sizes = _recorded(CallBatcher, _double(calls), BATCHED, delay_s=0.05, max_rows=16)

    async def run():
        return await asyncio.gather(*(batcher.submit(_inputs(r, float(i)))
                                      for i, r in enumerate([1, 2, 1])))

    outputs = asyncio.run(run())
    assert len(calls) == 1 and sizes == [4]
    for (i, rows), out in zip(enumerate([1, 2, 1]), outputs):
        expected = torch.full((rows, 3), 2.0 * i) + i + 2.0
        assert torch.equal(out["y"], expected)


@pytest.mark.fast
def test_what_cannot_share_a_call_does_not():
    calls = []
    batcher, sizes = _recorded(CallBatcher, _double(calls), BATCHED, delay_s=0.05, max_rows=3)
    submitted = [_inputs(1, 0.0), _inputs(1, 1.0, width=4),  # another shape
                 _inputs(1, 2.0, shared=5.0),  # another shared input: the waiting group runs first
                 _inputs(2, 3.0), _inputs(1, 4.0)]  # these two fill max_rows together

    async def run():
        return await asyncio.gather(*(batcher.submit(inputs) for inputs in submitted))

    outputs = asyncio.run(run())
    assert sorted(sizes) == [1, 1, 1, 3] and len(calls) == 4
    for inputs, out in zip(submitted, outputs):
        expected = inputs["x"] * 2 + inputs["t"][:, None] + inputs["shared"].sum()
        assert torch.equal(out["y"], expected)


def _streams_out_of_phase(max_in_flight: int) -> list[int]:
    """Two streams of 5 sequential calls (60 ms each), the second starting 20 ms after the first,
    through a 10 ms window: the batch sizes run."""
    async def slow(inputs, _context=None):
        await asyncio.sleep(0.06)
        return {"y": inputs["x"] * 2}

    batcher, sizes = _recorded(CallBatcher, slow, BATCHED, delay_s=0.01, max_rows=8,
                               max_in_flight=max_in_flight)

    async def stream(fill: float, start_s: float):
        await asyncio.sleep(start_s)
        for _ in range(5):
            out = await batcher.submit(_inputs(1, fill))
            assert torch.equal(out["y"], torch.full((1, 3), 2 * fill))
            await asyncio.sleep(0.001)  # the scheduler step between two DiT calls

    async def run():
        await asyncio.gather(stream(1.0, 0.0), stream(2.0, 0.02))

    asyncio.run(run())
    return sizes


@pytest.mark.fast
def test_streams_out_of_phase_fall_in_step_while_the_dit_is_busy():
    """A call arriving while another runs waits here and gets a fresh window when it returns, so the
    stream just answered joins it: after the first call, the two streams share every call."""
    sizes = _streams_out_of_phase(max_in_flight=1)
    assert sum(sizes) == 10 and sizes.count(2) >= 3, sizes
    # with calls run as soon as their window ends, the streams never meet
    assert _streams_out_of_phase(max_in_flight=100) == [1] * 10


@pytest.mark.fast
def test_no_window_when_every_active_stream_is_waiting():
    """With a 1 s window: a lone stream's calls run at once (a true-CFG pair still as one call),
    and two streams' calls run together as soon as the second one arrives."""
    calls = []
    batcher, sizes = _recorded(CallBatcher, _double(calls), BATCHED, delay_s=1.0, max_rows=8)

    async def lone_stream():
        with batcher.stream():
            for _ in range(3):
                pair = await asyncio.gather(batcher.submit(_inputs(1, 1.0)),
                                            batcher.submit(_inputs(1, 2.0)))
                assert [float(out["y"][0, 0]) for out in pair] == [5.0, 8.0]  # 2x + t + 2

    async def stream(fill: float, start_s: float):
        with batcher.stream():
            await asyncio.sleep(start_s)
            return await batcher.submit(_inputs(1, fill))

    async def two_streams():
        return await asyncio.gather(stream(1.0, 0.0), stream(2.0, 0.05))

    began = time.perf_counter()
    asyncio.run(lone_stream())
    assert time.perf_counter() - began < 0.5 and sizes == [2, 2, 2]
    began = time.perf_counter()
    asyncio.run(two_streams())
    assert time.perf_counter() - began < 0.5 and sizes[3:] == [2]
    assert batcher.active_streams == 0


@pytest.mark.fast
def test_a_failed_merged_call_fails_each_caller():
    async def broken(inputs, _context=None):
        raise RuntimeError("dit_transformer: [UNAVAILABLE] gone")

    batcher, sizes = _recorded(CallBatcher, broken, BATCHED, delay_s=0.01, max_rows=8)

    async def run():
        return await asyncio.gather(batcher.submit(_inputs(1, 0.0)), batcher.submit(_inputs(1, 1.0)),
                                    return_exceptions=True)

    assert [str(r) for r in asyncio.run(run())] == ["dit_transformer: [UNAVAILABLE] gone"] * 2


@pytest.fixture
def batched_bls(model_dirs, tmp_path):
    """The tiny schnell repository in-process with batching on (20 ms)."""
    yield pb.wire_repository(model_dirs["schnell"], tmp_path, batch_delay_us=20000)
    pb.reset()


_request = pb.flux_bls_request


def _image(request) -> np.ndarray:
    for response, _ in request.sender.sent:
        if response is not None and not response.has_error():
            names = {t.name(): t for t in response.output_tensors()}
            if "image" in names:
                return names["image"].as_numpy()
    raise AssertionError(f"no image: {request.sender.sent}")


@pytest.mark.fast
def test_bls_shares_dit_calls_between_streams_at_different_steps(batched_bls):
    fields = [dict(prompt=p, height=64, width=64, num_inference_steps=s, seed=i)
              for i, (p, s) in enumerate([("a cat", 4), ("a red circle", 3), ("a dog", 4), ("x", 2)])]
    together = [_request(**f) for f in fields]
    pb.serve(batched_bls, together)
    merged = pb.calls["dit_transformer"]
    alone = []
    for f in fields:
        request = _request(**f)
        pb.serve(batched_bls, [request])
        alone.append(request)
    assert merged < sum(f["num_inference_steps"] for f in fields)  # calls were shared
    assert max(batched_bls.metrics.dit_batch.observations) == 4
    for a, b in zip(together, alone):
        diff = np.abs(_image(a).astype(int) - _image(b).astype(int)).max()
        assert diff <= 1, diff  # batched kernels round differently: at most one level


def _concurrently(srv, fields_list, **kwargs) -> list:
    results = [None] * len(fields_list)

    def one(i):
        results[i] = served_generate(srv, fields_list[i], timeout_s=120, **kwargs)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(fields_list))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_served_streams_stay_apart_and_close_to_alone(served_batched):
    fields = [dict(prompt=p, height=64, width=64, num_inference_steps=4, seed=10 + i)
              for i, p in enumerate(["a cat", "a dog", "a red circle", "a blue square"] * 2)]
    merged_before = metric(served_batched, "flux_dit_merged_calls_total")
    together = _concurrently(served_batched, fields)
    merged = metric(served_batched, "flux_dit_merged_calls_total") - merged_before
    alone = [served_generate(served_batched, f, timeout_s=60) for f in fields]
    diffs = [int(np.abs(a.image.astype(int) - b.image.astype(int)).max())
             for a, b in zip(together, alone)]
    print(f"\nbatching on, 8 concurrent streams: {merged:.0f} merged DiT calls; "
          f"max uint8 diff to the same request alone per stream: {diffs}")
    assert merged > 0 and max(diffs) <= 1
    assert all(r.seed == f["seed"] for r, f in zip(together, fields))


def test_served_cancel_and_failures_with_batching_on(served_batched):
    inject(served_batched, "dit_transformer", fail_next=2)
    fields = [dict(prompt="a cat", height=64, width=64, num_inference_steps=3, seed=i)
              for i in range(4)]
    results = _concurrently(served_batched, fields)
    assert all(r.error is None for r in results), [r.error for r in results]
    (served_batched.fault_dir / "dit_transformer.json").unlink()
    inject(served_batched, "dit_transformer", delay_ms=100)
    cancelled = _concurrently(served_batched, [dict(prompt="a dog", height=64, width=64,
                                                    num_inference_steps=60, seed=7)] * 2,
                              stop_after_steps=2)
    (served_batched.fault_dir / "dit_transformer.json").unlink()
    assert all(r.kinds == ["step", "step", "cancelled"] for r in cancelled)
    after = served_generate(served_batched, fields[0], timeout_s=60)
    assert after.error is None
    assert np.abs(after.image.astype(int) - results[0].image.astype(int)).max() <= 1
