"""The event log format: round trip, streaming, and every bad input the format names."""

import gzip

import pytest

from dynvm_trace import events, logfile
from dynvm_trace.logfile import LogFormatError, LogReader, LogWriter, make_header

HEADER = make_header("emulate", "emulated", 4096, 0, anchor_unix_ns=1_700_000_000_000_000_000)


def write_log(path, records, header=HEADER):
    with LogWriter(path, header) as w:
        w.write(records)
    return path


def merges(n, start=0):
    return [events.event("merge", start + i, "emulate", pid=7, vm="vm1", pfn=i, addr=i * 4096)
            for i in range(n)]


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz"])
def test_round_trip_keeps_every_record_and_the_header(tmp_path, name):
    recs = merges(4099) + [events.event("lost", 5000, "emulate", count=3, where="perf", why="full")]
    path = write_log(tmp_path / name, recs)
    reader = LogReader(path)
    assert reader.header == HEADER
    assert list(reader.records()) == recs
    assert reader.warnings == []


def test_gzip_is_chosen_by_extension(tmp_path):
    path = write_log(tmp_path / "a.jsonl.gz", merges(3))
    assert gzip.decompress(path.read_bytes()).count(b"\n") == 4


def test_reading_streams_in_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(logfile, "BLOCK", 4096)
    path = write_log(tmp_path / "a.jsonl", merges(10_007))
    batches = list(LogReader(path).batches())
    assert len(batches) > 10
    assert sum(map(len, batches)) == 10_007
    assert [r["ts"] for b in batches for r in b] == list(range(10_007))


def test_multi_member_gzip_is_read_whole(tmp_path):
    path = tmp_path / "a.jsonl.gz"
    write_log(path, merges(5))
    with open(path, "ab") as f:  # a second gzip member appended, as `cat a.gz b.gz` makes
        f.write(gzip.compress(b'{"kind":"merge","ts":99,"src":"emulate"}\n'))
    assert [r["ts"] for r in LogReader(path).records()] == [0, 1, 2, 3, 4, 99]


def test_truncated_last_line_is_a_warning_not_an_error(tmp_path):
    path = write_log(tmp_path / "a.jsonl", merges(11))
    data = path.read_bytes()
    path.write_bytes(data[:-20])  # killed mid-write of the last record
    seen = []
    reader = LogReader(path, seen.append)
    assert len(list(reader.records())) == 10
    assert seen == [f"{path}:12: last line is cut short (recorder killed?); ignored"]


def test_gzip_stream_ending_early_is_a_warning(tmp_path):
    path = write_log(tmp_path / "a.jsonl.gz", merges(2000))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    reader = LogReader(path)
    got = list(reader.records())
    assert 0 < len(got) < 2000
    assert got == merges(len(got))
    assert any("gzip stream ends early" in w for w in reader.warnings)


def test_malformed_line_in_the_middle_names_file_and_line(tmp_path):
    path = tmp_path / "a.jsonl"
    write_log(path, merges(3))
    lines = path.read_bytes().split(b"\n")
    lines.insert(2, b'{"kind": "merge", "ts": 1, ')
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(LogFormatError) as e:
        list(LogReader(path).records())
    assert str(e.value) == f"{path}:3: not valid JSON"


@pytest.mark.parametrize("line, message", [
    (b"[1, 2]", "not an event record (a JSON object with a kind)"),
    (b'{"ts": 5}', "not an event record (a JSON object with a kind)"),
    (b'"merge"', "not an event record (a JSON object with a kind)"),
])
def test_a_line_that_is_json_but_not_a_record(tmp_path, line, message):
    path = tmp_path / "a.jsonl"
    write_log(path, merges(2))
    path.write_bytes(path.read_bytes() + line + b"\n")
    with pytest.raises(LogFormatError) as e:
        list(LogReader(path).records())
    assert str(e.value) == f"{path}:4: {message}"


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    with pytest.raises(LogFormatError, match=r"empty.jsonl:1: empty file"):
        LogReader(path)


def test_empty_gzip_file(tmp_path):
    path = tmp_path / "empty.jsonl.gz"
    path.write_bytes(gzip.compress(b""))
    with pytest.raises(LogFormatError, match=r"empty.jsonl.gz:1: empty file"):
        LogReader(path)


def test_missing_header(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"kind":"merge","ts":1,"src":"emulate"}\n')
    with pytest.raises(LogFormatError, match=r"a.jsonl:1: missing header"):
        LogReader(path)


def test_not_json_at_all(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"slice merge cnt: 5\r\n")
    with pytest.raises(LogFormatError, match=r"a.jsonl:1: first line is not JSON"):
        LogReader(path)


def test_unknown_format_version(tmp_path):
    path = write_log(tmp_path / "a.jsonl", merges(1), dict(HEADER, version=99))
    with pytest.raises(LogFormatError, match=r"a.jsonl:1: format version 99 is not supported"):
        LogReader(path)


def test_corrupt_gzip_stream(tmp_path):
    path = write_log(tmp_path / "a.jsonl.gz", merges(5000))
    data = bytearray(path.read_bytes())
    for i in range(200, 260):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    with pytest.raises(LogFormatError, match=r"a.jsonl.gz: corrupt gzip stream"):
        LogReader(path)
        list(LogReader(path).records())


def test_missing_file(tmp_path):
    with pytest.raises(LogFormatError, match=r"nope.jsonl: no such file"):
        LogReader(tmp_path / "nope.jsonl")


def test_record_validation_names_each_problem():
    assert events.problems(events.event("merge", 1, "emulate", pfn=3)) == []
    assert events.problems({"kind": "merge", "ts": "x", "src": "e"}) == ["field 'ts' should be int, not str"]
    assert events.problems({"kind": "lost", "ts": 1, "src": "e", "count": True, "where": "a", "why": "b"}) \
        == ["field 'count' should be int, not bool"]
    assert events.problems({"kind": "bogus"}) == ["unknown kind 'bogus'"]
    assert events.problems({"kind": "counters", "ts": 1, "src": "e"}) == \
        ["missing field 'group'", "missing field 'values'"]


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz"])
def test_a_bad_line_far_into_the_file_is_named_exactly(tmp_path, monkeypatch, name):
    monkeypatch.setattr(logfile, "BLOCK", 4096)
    monkeypatch.setattr(logfile, "PARSE", 1000)  # many pieces per block, lines across blocks
    lines = [logfile.jsonio.dumps(r) for r in merges(3000)]
    lines[1000:1000] = [b"", b"   "]  # blank lines count as lines, and are skipped
    lines.insert(2500, b'{"kind": oops}')
    opener = gzip.open if name.endswith(".gz") else open
    path = tmp_path / name
    with opener(path, "wb") as f:
        f.write(logfile.jsonio.dumps(HEADER) + b"\n" + b"\n".join(lines) + b"\n")
    reader = LogReader(path)
    with pytest.raises(LogFormatError) as e:
        for _ in reader.batches():
            pass
    assert str(e.value) == f"{path}:2502: not valid JSON"  # the header is line 1
