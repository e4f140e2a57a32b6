"""The key layout: one place, cluster-ready hash tags, and the stored header."""

from __future__ import annotations

import pytest
from redis.cluster import key_slot

from celery_perkey_backend.keys import KeyLayout, parse_ready

LAYOUT = KeyLayout(prefix="celery-perkey:")


@pytest.mark.parametrize(
    "task_id",
    ["d2a4-uuid", "a}b", "{x}", "}", "{", "sp ace", "ünïcode", "*?[\\", "x" * 500, "a{b}c"],
)
def test_a_tasks_keys_share_one_slot(task_id: str) -> None:
    names = [LAYOUT.result(task_id), LAYOUT.state(task_id), LAYOUT.watchers(task_id)]
    assert len(set(names)) == 3
    assert len({key_slot(name.encode()) for name in names}) == 1


@pytest.mark.parametrize("group_id", ["g1", "g}1", "{g"])
def test_a_groups_and_its_chords_keys_share_one_slot(group_id: str) -> None:
    names = [*LAYOUT.chord_keys(group_id), LAYOUT.group(group_id)]
    assert len(set(names)) == 8
    assert len({key_slot(name.encode()) for name in names}) == 1


@pytest.mark.parametrize("group_id", ["g1", "g}1", "{g", "a{b}c", "ünï", "x" * 300])
def test_a_chord_key_names_its_group(group_id: str) -> None:
    for name in LAYOUT.chord_keys(group_id):
        assert LAYOUT.chord_group(name) == group_id
    assert LAYOUT.chord_group(LAYOUT.result(group_id)) is None
    assert LAYOUT.chord_group(LAYOUT.group(group_id)) is None
    assert LAYOUT.chord_group("celery-perkey:c:{}:c") is None


def test_ids_with_braces_stay_distinct() -> None:
    assert LAYOUT.result("a}b") != LAYOUT.result("a")
    assert LAYOUT.result("a}b").endswith("a}b")


def test_plain_ids_are_readable() -> None:
    assert LAYOUT.result("abc") == "celery-perkey:r:{abc}"
    assert LAYOUT.legacy("abc") == "celery-task-meta-abc"


def test_parse_ready() -> None:
    record = parse_ready(b'S1732841234567|{"status": "SUCCESS"}')
    assert record.letter == "S"
    assert record.written_ms == 1732841234567
    assert record.payload == b'{"status": "SUCCESS"}'


@pytest.mark.parametrize("bad", [b"", b"no header", b"S|x", b"Sabc|x"])
def test_parse_ready_rejects_foreign_values(bad: bytes) -> None:
    with pytest.raises(ValueError, match="header"):
        parse_ready(bad)
