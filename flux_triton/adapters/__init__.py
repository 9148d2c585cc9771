"""Triton Python-backend adapters: the logic of every `model_repository/*/1/model.py`.

`triton_python_backend_utils` exists only inside Triton's stub process, so each adapter class takes
it as its `pb` attribute (set by the 10-line `model.py`); this package never imports it, and the
tests drive the adapters with a stand-in.
"""
