"""Log writing off the recorder's hot path.

Encoding events into JSON lines is most of what a recorder spends per event (~80 % of its CPU
time in a COW-fault storm: docs/performance.md). During an event burst that CPU time is taken
from the traced workload, whose cores the recorder shares. `SpooledLogWriter` moves it out of
the way: the recorder appends each batch to a spool file (a pickle: a memory copy), and a
child process at the lowest CPU priority (nice 19) turns the spool into the log with
LogWriter. The kernel runs the child when the workload leaves a CPU idle; after a burst it
catches up.

The spool is a hidden file next to the log (`.NAME.spool`, on the file system the user chose
for the log, not in a RAM-backed /tmp), unlinked as soon as the child has opened it: nothing
is left behind, whatever happens. The recorder announces each batch on the child's stdin
(its byte length; 0 ends the log). If the recorder dies, the child still writes every batch
it was told about, then closes the log. Its stdout says `ready` once the log exists with
its header, and at the end `done` or `error: WHY`.

    python -m dynvm_trace.log_spool SPOOL LOG   (header JSON, then lengths, on stdin)
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from . import exitcodes, jsonio
from .logfile import LogWriter

if TYPE_CHECKING:
    from .ksm_columns import EventColumns

NICE = 19


class LogWriteError(OSError):
    """The log could not be written (e.g. its disk is full); str() says which and why."""

    exit_code = exitcodes.OUTPUT_FAILED


class SpooledLogWriter:
    """LogWriter's interface (write, flush, close, records) with the encoding done by a child
    process at nice 19."""

    def __init__(self, path: str | os.PathLike, header: dict[str, Any]):
        self.path = Path(path)
        spool = self.path.with_name(f".{self.path.name}.spool")
        try:
            self._spool: BinaryIO = open(spool, "wb")
        except OSError as e:
            raise LogWriteError(f"{self.path}: cannot write there: {e.strerror}") from None
        self._child = subprocess.Popen(
            [sys.executable, "-m", __name__, str(spool), str(self.path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            process_group=0)  # a Ctrl-C stops the recorder, which then closes the log
        self._announce(jsonio.dumps(header).decode())
        self._expect("ready")
        self.records = 0
        self._pending: list[int] = []  # bytes of batches written, not yet announced

    def _announce(self, line: str) -> None:
        try:
            self._child.stdin.write(line + "\n")
            self._child.stdin.flush()
        except BrokenPipeError:  # the child is gone: its last word says why
            self._failed(self._child.stdout.readline().strip())

    def _expect(self, word: str) -> None:
        """Read the child's next word; raise LogWriteError unless it is `word`."""
        said = self._child.stdout.readline().strip()
        if said != word:
            self._failed(said)

    def _failed(self, said: str) -> None:
        """Raise LogWriteError with what the child said (`error: WHY`), or how it ended."""
        self._child.wait()
        raise LogWriteError(said.removeprefix("error: ") if said.startswith("error: ") else
                            f"{self.path}: the log writer stopped ({said or 'no answer'}, "
                            f"exit status {self._child.returncode})")

    def write(self, records: list[dict[str, Any]], columns: EventColumns | None = None) -> None:
        """As LogWriter.write: the batch goes to the spool; flush() hands it to the child."""
        data = pickle.dumps((records, columns), protocol=pickle.HIGHEST_PROTOCOL)
        self._spool.write(data)
        self._pending.append(len(data))
        self.records += len(records) + (len(columns) if columns is not None else 0)

    def flush(self) -> None:
        self._spool.flush()
        for n in self._pending:
            self._announce(str(n))
        self._pending.clear()

    def close(self) -> None:
        """Hand over the rest and wait until the child has written all of it into the log."""
        if self._spool.closed:
            return
        self.flush()
        self._spool.close()
        self._announce("0")
        self._child.stdin.close()
        self._expect("done")
        self._child.wait()


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EOFError(f"the spool ends {n - len(data)} bytes short of a batch")
    return data


def encode(spool: str, log: str, lines: Any, say: Any) -> None:
    """The child's work: the header from `lines` (stdin), then one batch per announced length,
    into the log; says `ready`, then `done` or `error: WHY` with `say`."""
    try:
        f = open(spool, "rb")
        os.unlink(spool)
        writer = LogWriter(log, jsonio.loads(next(lines)))
    except (OSError, StopIteration, ValueError) as e:
        say(f"error: {log}: {e}")
        return
    say("ready")
    try:
        with f, writer:
            for line in lines:  # ends at EOF: the recorder is gone, all it announced is written
                n = int(line)
                if n == 0:
                    break
                writer.write(*pickle.loads(_read_exact(f, n)))
                writer.flush()
    except (OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        say(f"error: {log}: {e}")
        return
    say("done")


def main() -> None:
    os.setpriority(os.PRIO_PROCESS, 0, NICE)

    def say(word: str) -> None:
        print(word, flush=True)

    try:
        encode(sys.argv[1], sys.argv[2], iter(sys.stdin.readline, ""), say)
    except BrokenPipeError:  # the recorder is gone: nobody to tell
        pass


if __name__ == "__main__":
    main()
