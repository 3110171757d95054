"""The one reader of events.jsonl (runs.events.read_events): the trainer, the web app's events API and its job
runner all read through it."""

import json

from conjure.runs.events import Event, EventLog, read_events
from conjure.runs.folder import VALIDATION_IMAGE, validation_image_name


def test_complete_lines_only_and_the_cursor_goes_on_from_there(tmp_path):
    path = tmp_path / "events.jsonl"
    lines = [json.dumps({"event": "start"}), '{"event": "step", "st', json.dumps({"event": "step", "step": 1})]
    path.write_text("\n".join(lines) + "\n" + '{"event": "end", "sta')  # a garbled line, then one being written
    first = read_events(path)
    assert [e["event"] for e in first.events] == ["start", "step"]  # the garbled line is read, gives no event
    assert first.next == path.read_bytes().rfind(b"\n") + 1
    assert read_events(path, first.next).events == []
    with path.open("a") as f:
        f.write('tus": "completed"}\n')
    rest = read_events(path, first.next)
    assert rest.events == [{"event": "end", "status": "completed"}] and rest.next == path.stat().st_size


def test_limit_and_a_cursor_inside_a_line(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps({"event": "step", "step": s}) + "\n" for s in range(5)))
    page = read_events(path, limit=2)
    assert [e["step"] for e in page.events] == [0, 1]
    assert [e["step"] for e in read_events(path, page.next).events] == [2, 3, 4]
    assert [e["step"] for e in read_events(path, page.next - 4).events] == [2, 3, 4]  # from the next line start
    assert read_events(path, 10**6).events == [] and read_events(path, 10**6).next == 10**6


def test_a_missing_file_has_no_events(tmp_path):
    missing = read_events(tmp_path / "none.jsonl", 7)
    assert missing.events == [] and missing.next == 7


def test_event_names_are_written_as_plain_strings(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    log.emit(Event.STEP, step=1, loss=0.5)
    log.close()
    line = (tmp_path / "events.jsonl").read_text()
    assert json.loads(line)["event"] == "step" and '"event": "step"' in line
    assert read_events(tmp_path / "events.jsonl").events[0]["event"] == Event.STEP


def test_validation_image_names_round_trip():
    found = VALIDATION_IMAGE.match(validation_image_name(3, -7))
    assert found and (int(found.group(1)), int(found.group(2))) == (3, -7)
