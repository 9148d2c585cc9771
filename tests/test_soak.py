"""The soak script itself, for half a minute: mixed clients, faults and a killed component, every
request accounted for (the 30-minute run is `make soak`, benchmarks/results/soak-cpu.json)."""

from __future__ import annotations

from devtools.soak import run


def test_a_short_soak_loses_nothing(model_dirs, tmp_path):
    result = run(minutes=0.5, clients=3, kill_every_min=0.2, fault_every_s=4,
                 model_dir=model_dirs["schnell"], workdir=tmp_path, max_queue=4)
    outcomes = result["outcomes"]
    print(f"\nshort soak: {outcomes}; errors {result['errors_by_kind']}; "
          f"kills {[e['model'] for e in result['timeline'] if e['event'] == 'killed']}")
    assert result["problems"] == [] and result["lost"] == 0
    assert outcomes.get("image", 0) > 0 and outcomes.get("invalid_refused", 0) > 0
    assert any(e["event"] == "killed" for e in result["timeline"])
    assert result["shared_memory_left"] == [] and not result["supervisor"]["failed"]
    assert result["passed"]
