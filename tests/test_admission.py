"""The line of flux_triton.admission: first in, first out, places told, bounded, and left cleanly."""

from __future__ import annotations

import asyncio

import pytest

from flux_triton.admission import Admission, LocalCount, QueueFull

pytestmark = pytest.mark.fast


def run(coroutine):
    return asyncio.run(coroutine)


def test_requests_past_max_inflight_wait_first_in_first_out_and_hear_their_place():
    async def scenario():
        admission = Admission(max_inflight=2)
        places: dict[str, list[int]] = {name: [] for name in "abcde"}
        tickets = {name: admission.enter(on_position=places[name].append) for name in "abcde"}
        assert [tickets[n].running for n in "abcde"] == [True, True, False, False, False]
        assert places == {"a": [], "b": [], "c": [1], "d": [2], "e": [3]}
        order = []

        async def wait(name):
            assert await admission.wait(tickets[name], lambda: None, poll_s=0.01) is None
            order.append(name)

        waiters = [asyncio.create_task(wait(n)) for n in "cde"]
        admission.leave(tickets["b"])
        await asyncio.sleep(0.05)
        assert order == ["c"] and places["d"] == [2, 1] and places["e"] == [3, 2]
        admission.leave(tickets["a"])
        admission.leave(tickets["c"])
        await asyncio.gather(*waiters)
        assert order == ["c", "d", "e"] and admission.running == 2 and admission.waiting == 0
        for name in "de":
            admission.leave(tickets[name])
        assert admission.running == 0
    run(scenario())


def test_a_full_queue_refuses_at_once_and_says_when_to_retry():
    async def scenario():
        count = LocalCount()
        admission = Admission(max_inflight=1, max_queue=1, count=count)
        first, second = admission.enter(), admission.enter()
        with pytest.raises(QueueFull) as refused:
            admission.enter()
        assert refused.value.max_queue == 1 and refused.value.retry_after_s >= 1
        assert "MAX_QUEUE=1" in str(refused.value) and count.waiting == 1
        admission.leave(first)
        assert second.running and count.waiting == 0
        admission.enter()  # room again
    run(scenario())


def test_max_queue_zero_runs_or_refuses():
    async def scenario():
        admission = Admission(max_inflight=1, max_queue=0)
        admission.enter()
        with pytest.raises(QueueFull):
            admission.enter()
    run(scenario())


def test_a_request_that_stops_while_waiting_leaves_the_line_and_the_others_move_up():
    async def scenario():
        admission = Admission(max_inflight=1)
        running = admission.enter()
        places = []
        leaving = admission.enter()
        staying = admission.enter(on_position=places.append)
        assert await admission.wait(leaving, lambda: "cancelled", poll_s=0.01) == "cancelled"
        assert places == [2, 1] and admission.waiting == 1 and leaving.done
        admission.leave(leaving)  # a second leave is nothing
        admission.leave(running)
        assert staying.running and admission.count.waiting == 0
    run(scenario())


@pytest.mark.parametrize("inflight, queue", [(0, None), (1, -1)])
def test_limits_out_of_range_are_refused(inflight, queue):
    with pytest.raises(ValueError):
        Admission(inflight, queue)


def test_keys_take_turns_so_a_burst_does_not_starve_another_client():
    async def scenario():
        admission = Admission(max_inflight=1)
        first = admission.enter(key="burst")
        burst = [admission.enter(key="burst") for _ in range(4)]
        places = []
        other = admission.enter(key="other", on_position=places.append)
        assert places == [2]  # after the burst's oldest, before the rest of it
        assert admission.order() == [burst[0], other, *burst[1:]]
        late = admission.enter(key="late")
        assert admission.order() == [burst[0], other, late, *burst[1:]]
        ran = []
        admission.leave(first)
        for _ in range(6):
            current = next(t for t in [*burst, other, late] if t.running and not t.done)
            ran.append("other" if current is other else "late" if current is late
                       else f"burst{burst.index(current)}")
            admission.leave(current)
        assert ran == ["burst0", "other", "late", "burst1", "burst2", "burst3"]
        assert admission.running == 0 and admission.waiting == 0 and not admission.rotation
    run(scenario())


def test_cancelling_a_waiting_task_gives_up_its_place():
    async def scenario():
        admission = Admission(max_inflight=1)
        admission.enter()
        ticket = admission.enter()
        task = asyncio.create_task(admission.wait(ticket))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert admission.waiting == 0 and ticket.done and admission.count.waiting == 0
    run(scenario())


def test_refusal_answers_from_any_thread_as_enter_would():
    """`refusal` is what Triton's execute thread asks, while the loop admits and releases, to
    refuse without waiting for the loop: it agrees with `enter` and never trips over the loop."""
    import threading

    async def scenario():
        assert Admission(max_inflight=1).refusal() is None  # unbounded: never refused
        admission = Admission(max_inflight=1, max_queue=1)
        first = admission.enter()
        assert admission.refusal() is None  # one place left in line
        second = admission.enter()
        refusal = admission.refusal()
        assert isinstance(refusal, QueueFull) and refusal.max_queue == 1
        assert refusal.retry_after_s >= 1
        with pytest.raises(QueueFull):
            admission.enter()
        admission.leave(first)
        assert second.running and admission.refusal() is None

        stop, errors = threading.Event(), []

        def ask():
            while not stop.is_set():
                try:
                    admission.refusal()
                except Exception as exc:  # noqa: BLE001 - any would be the bug
                    errors.append(exc)
                    return

        asker = threading.Thread(target=ask)
        asker.start()
        for i in range(2000):
            ticket = admission.enter(key=str(i % 3))  # waits behind `second`: the lines change
            admission.leave(ticket)
            await asyncio.sleep(0)
        stop.set()
        asker.join()
        assert errors == []
    run(scenario())
