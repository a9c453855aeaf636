"""A killed DeepSpeed op build leaves a lock file that would make every later DeepSpeed run on the machine wait
forever; the engine removes it when it is far older than a build."""

import os
import time

from grpo.engine import STALE_BUILD_LOCK_S, clear_stale_build_lock


def _lock(tmp_path, monkeypatch, age_s: float):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = tmp_path / "deepspeed_shm_comm"
    folder.mkdir(exist_ok=True)
    lock = folder / "lock"
    lock.touch()
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def test_a_lock_older_than_any_build_is_removed(tmp_path, monkeypatch):
    lock = _lock(tmp_path, monkeypatch, STALE_BUILD_LOCK_S + 60)
    assert clear_stale_build_lock() and not lock.exists()


def test_a_build_in_progress_keeps_its_lock(tmp_path, monkeypatch):
    lock = _lock(tmp_path, monkeypatch, 30)
    assert not clear_stale_build_lock() and lock.exists()


def test_no_lock_is_nothing_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert not clear_stale_build_lock()
