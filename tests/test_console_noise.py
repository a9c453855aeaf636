"""Library notices the console drops, and the ones it keeps."""

import logging

from stages.core import console


def _deepspeed_records(monkeypatch, driver: bool) -> list[str]:
    monkeypatch.setattr(console.os.path, "exists", lambda p: driver if p == "/proc/driver/nvidia" else False)
    console.setup("normal")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    ds = logging.getLogger("DeepSpeed")
    handler = Keep()
    ds.addHandler(handler)
    try:
        ds.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        ds.warning("zero stage 3 needs more memory")
    finally:
        ds.removeHandler(handler)
    return seen


def test_deepspeed_cpu_notice_dropped_without_a_gpu_driver(monkeypatch):
    assert _deepspeed_records(monkeypatch, driver=False) == ["zero stage 3 needs more memory"]


def test_deepspeed_cpu_notice_kept_where_a_gpu_driver_exists(monkeypatch):
    seen = _deepspeed_records(monkeypatch, driver=True)
    assert len(seen) == 2 and seen[0].startswith("Setting accelerator to CPU")
