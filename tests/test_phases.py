"""Reading the phase file: phases, reasons, and hostile files that must not hang or crash."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.errors import PhaseFileError
from workers.phases import MAX_PHASE_BYTES, read_phase, state_name


def test_absent_or_empty_file_has_no_phase(tmp_path: Path) -> None:
    phase = tmp_path / "phase"
    assert read_phase(str(phase)) is None
    phase.write_text("")
    assert read_phase(str(phase)) is None
    phase.write_text("\n  \n")
    assert read_phase(str(phase)) is None


def test_first_line_is_the_phase_and_a_reason_may_follow(tmp_path: Path) -> None:
    phase = tmp_path / "phase"
    phase.write_text("PHASE:failed\nReason: tests are red\n")
    reading = read_phase(str(phase))
    assert reading is not None
    assert (reading.phase, reading.reason) == ("PHASE:failed", "tests are red")
    phase.write_text("PHASE:done\n")
    reading = read_phase(str(phase))
    assert reading is not None and (reading.phase, reading.reason) == ("PHASE:done", None)


def test_binary_content_is_a_clear_error(tmp_path: Path) -> None:
    phase = tmp_path / "phase"
    phase.write_bytes(b"PHASE:\xff\xfe done")
    with pytest.raises(PhaseFileError, match="is not UTF-8 text"):
        read_phase(str(phase))


def test_huge_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    phase = tmp_path / "phase"
    with phase.open("wb") as handle:
        handle.truncate(100 * 1024 * 1024)
    with pytest.raises(PhaseFileError, match=f"limit {MAX_PHASE_BYTES}"):
        read_phase(str(phase))


def test_symlink_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("PHASE:done\n")
    os.symlink(target, tmp_path / "phase")
    with pytest.raises(PhaseFileError, match="is a symlink"):
        read_phase(str(tmp_path / "phase"))


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "phase"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            read_phase(str(fifo))
        except BaseException as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "reading a FIFO blocked"
    assert len(outcome) == 1 and isinstance(outcome[0], PhaseFileError)
    assert "not a regular file" in str(outcome[0])


def test_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "phase").mkdir()
    with pytest.raises(PhaseFileError):
        read_phase(str(tmp_path / "phase"))


@pytest.mark.parametrize(
    ("phase", "state"),
    [
        ("PHASE:awaiting_ci", "AWAITING_CI"),
        ("PHASE:done", "DONE"),
        ("PHASE:awaiting-review", "AWAITING_REVIEW"),
        ("weird phase!", "WEIRD_PHASE"),
        ("PHASE:", "UNKNOWN"),
    ],
)
def test_state_names_are_safe_celery_states(phase: str, state: str) -> None:
    assert state_name(phase) == state


@given(st.binary(max_size=4096))
def test_any_bytes_give_a_reading_none_or_a_phase_file_error(data: bytes) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "phase"
        path.write_bytes(data)
        try:
            reading = read_phase(str(path))
        except PhaseFileError:
            return
        if reading is not None:
            assert reading.phase == reading.phase.strip() and reading.phase
            assert "\n" not in reading.phase


@given(st.text(max_size=200))
def test_state_name_is_always_an_upper_identifier(phase: str) -> None:
    name = state_name(phase)
    assert name and name == name.upper()
    assert all(ch.isalnum() or ch == "_" for ch in name)
