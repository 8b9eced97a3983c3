"""The result cache's parts: keys, file hashes, atomic entries, locks, damage detection, pruning."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field

from runner.cache import (
    CorruptEntry,
    FileHashes,
    KeyMaker,
    ResultCache,
    base_key,
    cache_key,
    describe_changes,
    key_params,
    parse_age,
)
from runner.errors import RunnerError


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: str = "0-5"
    batch_size: int = 8
    show_progress: bool = Field(True, json_schema_extra={"cache_key": False})


def test_key_params_leave_out_batch_size_and_fields_that_say_so():
    assert key_params(Params(batch_size=2, show_progress=False)) == {"layers": "0-5"}
    assert base_key({"params": key_params(Params(batch_size=2))}) == base_key(
        {"params": key_params(Params(batch_size=64))}
    )
    assert base_key({"params": key_params(Params(layers="0-6"))}) != base_key(
        {"params": key_params(Params())}
    )


def test_cache_key_is_the_base_key_without_reads_and_changes_with_them():
    assert cache_key("abc", {}) == "abc"
    assert cache_key("abc", {"up": ["k1"]}) != cache_key("abc", {"up": ["k2"]})
    assert cache_key("abc", {"up": ["k1", "k2"]}) != cache_key("abc", {"up": ["k2", "k1"]})


def test_file_hashes_match_sha256_and_are_recomputed_when_the_file_changes(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x" * 1000)
    table = tmp_path / "hashes.json"
    hashes = FileHashes(table)
    assert hashes.sha256(path) == hashlib.sha256(b"x" * 1000).hexdigest()
    hashes.save()
    path.write_bytes(b"y" * 1000)  # same size; the mtime moves
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert FileHashes(table).sha256(path) == hashlib.sha256(b"y" * 1000).hexdigest()


def test_file_hashes_are_read_from_the_table_when_size_and_mtime_match(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x" * 1000)
    table = tmp_path / "hashes.json"
    hashes = FileHashes(table)
    hashes.sha256(path)
    hashes.save()
    # The table is what answers: plant another digest for the same (path, size, mtime).
    known = json.loads(table.read_text())
    known[str(path.resolve())][2] = "planted"
    table.write_text(json.dumps(known))
    assert FileHashes(table).sha256(path) == "planted"


def test_model_identity_is_the_weights_hash_not_the_name(tmp_path):
    first = tmp_path / "a.gguf"
    first.write_bytes(b"GGUF weights")
    second = tmp_path / "renamed.gguf"
    shutil.copyfile(first, second)
    keys = KeyMaker(tmp_path, FileHashes(None))
    assert keys.model_identity(str(first))["sha256"] == keys.model_identity(str(second))["sha256"]
    second.write_bytes(b"GGUF other weights")
    assert keys.model_identity(str(first))["sha256"] != keys.model_identity(str(second))["sha256"]


def test_a_missing_model_is_a_runner_error(tmp_path):
    with pytest.raises(RunnerError, match="no such file"):
        KeyMaker(tmp_path, FileHashes(None)).model_identity(str(tmp_path / "nope.gguf"))


def test_dataset_identity_hashes_a_local_file_and_keeps_its_settings(tmp_path):
    from runner.spec import DatasetSpec

    (tmp_path / "text.txt").write_text("some text")
    keys = KeyMaker(tmp_path, FileHashes(None))
    identity = keys.dataset_identity(DatasetSpec(name="text.txt", max_len=16))
    assert identity["source"]["sha256"] == hashlib.sha256(b"some text").hexdigest()
    assert identity["max_len"] == 16 and "name" not in identity


def test_describe_changes_names_each_changed_input_with_old_and_new():
    old = {"params": {"layers": "0-5", "k": 1}, "model": {"sha256": "a" * 64}}
    new = {"params": {"layers": "0-29", "k": 1}, "model": {"sha256": "b" * 64}}
    assert (
        describe_changes(old, new) == f"model.sha256 {'a' * 12} -> {'b' * 12}, params.layers '0-5' -> '0-29'"
    )
    assert describe_changes(old, old) == "no input changed"


def _store_one(cache: ResultCache, tmp_path: Path, base: str = "ab" * 32) -> Path:
    source = tmp_path / "source"
    source.mkdir(exist_ok=True)
    (source / "result.json").write_text('{"x": 1}')
    (source / "rows.csv").write_text("a\n1\n")
    with cache.lock(base):
        cache.store(
            base,
            {"result.json": source / "result.json", "data/rows.csv": source / "rows.csv"},
            {"key": base, "reads": {}, "created": "2020-01-01T00:00:00+00:00"},
        )
    return cache.entry_dir(base)


def test_a_stored_entry_reads_back_with_its_files(tmp_path):
    cache = ResultCache(tmp_path / "cache")
    _store_one(cache, tmp_path)
    entry = cache.lookup("ab" * 32)
    assert entry is not None and entry.key == "ab" * 32
    assert entry.path("data/rows.csv").read_text() == "a\n1\n"
    assert entry.files["result.json"]["sha256"] == hashlib.sha256(b'{"x": 1}').hexdigest()
    assert not list((tmp_path / "cache" / "tmp").iterdir())  # the temporary folder became the entry


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: (d / "files" / "data" / "rows.csv").write_text("a\n2\n"),
        lambda d: (d / "files" / "result.json").unlink(),
        lambda d: (d / "entry.json").write_text("{trunc"),
    ],
    ids=["changed file", "missing file", "truncated entry.json"],
)
def test_a_damaged_entry_is_detected(tmp_path, damage):
    cache = ResultCache(tmp_path / "cache")
    damage(_store_one(cache, tmp_path))
    with pytest.raises(CorruptEntry):
        cache.lookup("ab" * 32)


def test_temporary_folders_of_dead_writers_are_removed(tmp_path):
    cache = ResultCache(tmp_path / "cache")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    orphan = tmp_path / "cache" / "tmp" / f"{'cd' * 32}-{int(dead.stdout)}-deadbeef"
    (orphan / "files").mkdir(parents=True)
    _store_one(cache, tmp_path)
    assert not orphan.exists()
    assert cache.lookup("cd" * 32) is None  # a half-written entry is never an entry


def test_the_entry_lock_excludes_another_process(tmp_path):
    cache = ResultCache(tmp_path / "cache")
    lock = tmp_path / "cache" / "locks" / f"{'ef' * 32}.lock"
    with cache.lock("ef" * 32):
        assert _other_process_sees(lock, "LOCK_EX") == "held"
        assert _other_process_sees(lock, "LOCK_SH") == "held"  # a reader waits for a writer
    assert _other_process_sees(lock, "LOCK_EX") == "free"


def test_readers_share_the_entry_lock_and_a_writer_waits_for_them(tmp_path):
    cache = ResultCache(tmp_path / "cache")
    lock = tmp_path / "cache" / "locks" / f"{'ef' * 32}.lock"
    with cache.lock("ef" * 32, shared=True):
        assert _other_process_sees(lock, "LOCK_SH") == "free"
        assert _other_process_sees(lock, "LOCK_EX") == "held"
    assert _other_process_sees(lock, "LOCK_EX") == "free"


def _other_process_sees(lock: Path, mode: str) -> str:
    """Whether another process could take ``lock`` in ``mode`` now: ``free`` or ``held``."""
    probe = (
        "import fcntl, sys; f = open(sys.argv[1], 'a+b')\n"
        f"try:\n    fcntl.flock(f, fcntl.{mode} | fcntl.LOCK_NB); print('free')\n"
        "except BlockingIOError:\n    print('held')"
    )
    return subprocess.run(
        [sys.executable, "-c", probe, str(lock)], capture_output=True, text=True
    ).stdout.strip()


def test_prune_removes_entries_not_used_within_the_age(tmp_path):
    cache = ResultCache(tmp_path / "cache")
    _store_one(cache, tmp_path, "ab" * 32)  # created in 2020, never used since
    _store_one(cache, tmp_path, "cd" * 32)
    cache.touch(cache.lookup("cd" * 32))  # used now
    removed, freed = cache.prune(parse_age("30d"))
    assert removed == 1 and freed == len('{"x": 1}') + len("a\n1\n")
    assert cache.lookup("ab" * 32) is None and cache.lookup("cd" * 32) is not None
    assert cache.prune(None)[0] == 1 and cache.entries() == []


def test_parse_age_reads_units_and_refuses_others():
    assert parse_age("12h") == 12 * 3600 and parse_age("2") == 2 * 86400 and parse_age("90s") == 90
    with pytest.raises(RunnerError, match="30d, 12h, 45m or 90s"):
        parse_age("soon")
