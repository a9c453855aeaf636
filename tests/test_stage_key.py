"""What a stage key covers: config, inputs, code version and the content of local data; not the evaluation settings."""

import json

import pytest

from stages.core import lineage
from stages.core.recipe import load_recipe


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _key(recipe, stage="r1_zero", inputs=None):
    return lineage.stage_key(stage, getattr(recipe, stage), inputs or {"model": "runs:/0123/model"}, recipe)


def test_a_changed_data_file_at_the_same_path_is_a_new_key(tmp_path):
    data = _jsonl(tmp_path / "prompts.jsonl", [{"question": "1+1", "answer": "2"}])
    recipe = load_recipe("tiny", {"r1_zero.data": {"source": "path", "path": data}})
    before = _key(recipe)
    assert _key(recipe) == before  # the same content is the same key
    _jsonl(tmp_path / "prompts.jsonl", [{"question": "1+1", "answer": "3"}])
    assert _key(recipe) != before


def test_a_changed_file_in_a_data_folder_is_a_new_key(tmp_path):
    folder = tmp_path / "cot"
    folder.mkdir()
    (folder / "part-0.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    recipe = load_recipe("tiny", {"cold_start_sft.data": {"source": "path", "path": str(folder)}})
    before = _key(recipe, "cold_start_sft")
    (folder / "part-1.jsonl").write_text('{"prompt": "c", "completion": "d"}\n')
    added = _key(recipe, "cold_start_sft")
    (folder / "part-1.jsonl").write_text('{"prompt": "c", "completion": "e"}\n')
    assert len({before, added, _key(recipe, "cold_start_sft")}) == 3


def test_a_local_input_is_keyed_by_content_a_run_uri_by_its_string(tmp_path):
    data = _jsonl(tmp_path / "set.jsonl", [{"prompt": "a", "completion": "b"}])
    recipe = load_recipe("tiny")
    before = _key(recipe, "general_sft", {"model": "runs:/0123/model", "data": data})
    _jsonl(tmp_path / "set.jsonl", [{"prompt": "a", "completion": "c"}])
    assert _key(recipe, "general_sft", {"model": "runs:/0123/model", "data": data}) != before
    assert lineage.data_digests("general_sft", recipe.general_sft, {"model": "runs:/0123/model"}, recipe) == {}


def test_cold_start_sampling_r1_zero_prompts_is_keyed_by_them():
    """Without its own data, cold start samples prompts of the r1_zero section: they are part of its key."""
    base = load_recipe("tiny")
    other = load_recipe("tiny", {"r1_zero.data.max_digits": 3})
    assert _key(base, "cold_start_sft") != _key(other, "cold_start_sft")


def test_eval_settings_keep_the_stage_key_and_change_the_eval_key():
    base = load_recipe("tiny")
    more = load_recipe("tiny", {"eval.num_prompts": 64})
    assert _key(base) == _key(more)
    assert lineage.eval_key(_key(base), base) != lineage.eval_key(_key(more), more)
    assert lineage.eval_key(_key(base), base) == lineage.eval_key(_key(more), base)


def test_a_new_package_version_or_commit_is_a_new_key(monkeypatch):
    recipe = load_recipe("tiny")
    before = _key(recipe)
    monkeypatch.setattr(lineage.metadata, "version", lambda name: "9.9.9")
    bumped = _key(recipe)
    assert bumped != before and lineage.code_version().startswith("9.9.9")
    monkeypatch.setattr(lineage, "_git_commit", lambda: "f" * 40)
    assert lineage.code_version() == "9.9.9+" + "f" * 40 and _key(recipe) not in (before, bumped)


@pytest.mark.parametrize("checkout", [True, False])
def test_the_commit_is_read_from_a_checkout_only(monkeypatch, tmp_path, checkout):
    """An installed package (no .git next to it) has no commit, even inside someone else's repository."""
    import subprocess

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false",
                    "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    root = tmp_path if checkout else tmp_path / "site-packages"
    root.mkdir(exist_ok=True)
    monkeypatch.setattr(lineage, "REPO_ROOT", root)
    lineage._git_commit.cache_clear()
    try:
        commit = lineage._git_commit()
    finally:
        lineage._git_commit.cache_clear()
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout
    assert commit == (head.strip() if checkout else None)
