"""The encryptor's audit log read incrementally: what a fresh reader sees, whatever was appended,
torn or replaced between reads."""

from __future__ import annotations

import os

from pecbir_encryptor.audit import AuditLog


def _fresh(path, actions):
    return AuditLog(path).read(actions=actions)


def test_a_followed_read_equals_a_fresh_one_after_appends(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    assert log.read(actions={"upload"}) == []
    for i in range(3):
        log.write(action="upload", image_id=f"img-{i}")
        log.write(action="view", image_id=f"img-{i}")
        uploads = log.read(actions={"upload"})
        assert uploads == _fresh(path, {"upload"})
        assert [r["image_id"] for r in uploads] == [f"img-{j}" for j in range(i + 1)]
    assert log.read(actions={"upload"}, last=2) == uploads[-2:]
    assert log.read() == _fresh(path, None) and len(log.read()) == 6
    # only the bytes appended since the last read are parsed: rewrite the old ones in place
    # (same length) and the followed reader keeps what it parsed, a fresh one sees the change
    data = path.read_bytes()
    path.write_bytes(data.replace(b"img-0", b"img-X"))
    assert log.read(actions={"upload"})[0]["image_id"] == "img-0"
    assert _fresh(path, {"upload"})[0]["image_id"] == "img-X"


def test_a_line_being_written_is_read_once_complete(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.write(action="upload", image_id="a")
    with path.open("ab") as file:  # half a record, as another writer is mid-line
        file.write(b'{"action": "upload", "image_id": "b"')
    assert [r["image_id"] for r in log.read(actions={"upload"})] == ["a"]
    with path.open("ab") as file:
        file.write(b"}\n")
    assert [r["image_id"] for r in log.read(actions={"upload"})] == ["a", "b"]


def test_a_torn_line_is_skipped_and_a_replaced_log_reread(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.write(action="upload", image_id="a")
    with path.open("ab") as file:  # a crash mid-write: the next record lands on that line
        file.write(b'{"action": "upl')
    log.write(action="upload", image_id="b")
    log.write(action="upload", image_id="c")
    assert [r["image_id"] for r in log.read(actions={"upload"})] == ["a", "c"]
    assert log.read(actions={"upload"}) == _fresh(path, {"upload"})
    path.unlink()
    AuditLog(path).write(action="upload", image_id="d")  # a new, shorter log
    assert [r["image_id"] for r in log.read(actions={"upload"})] == ["d"]


def test_a_log_replaced_by_a_longer_one_is_read_from_its_start(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.write(action="upload", image_id="old")
    assert len(log.read(actions={"upload"})) == 1
    replacement = AuditLog(tmp_path / "new.jsonl")
    for i in range(5):
        replacement.write(action="upload", image_id=f"new-{i}")
    os.replace(tmp_path / "new.jsonl", path)
    assert [r["image_id"] for r in log.read(actions={"upload"})] == [f"new-{i}" for i in range(5)]
