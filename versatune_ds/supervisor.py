"""The launchers' supervisor: start the launch command, keep secrets out of its output, forward stop signals.

    python -m versatune_ds.supervisor --log LOG --run-dir RUN_DIR [--forward child|tree]
                                      [--stop-signal SIGUSR1] -- COMMAND ...

Every launcher in launchers/ runs its one launch command under this process, which

1. starts COMMAND with the environment variable LAUNCH_ID_VAR set to a fresh id, its stdout and stderr
   joined into one pipe;
2. copies that output, line by line with every secret redacted (`versatune_ds.redaction`), to its own
   stdout (the terminal or the Slurm job log) and appends it to LOG (in `$RUN_DIR/logs/`);
3. on SIGTERM, SIGHUP, SIGUSR1 or SIGUSR2 sends `--stop-signal` (one of `train.stop_signals`) on, so the ranks
   checkpoint at the next step boundary and exit: with `--forward child` to COMMAND itself (torchrun with
   `--signals-to-handle`, and srun, pass it on to the ranks), with `--forward tree` to every process under
   COMMAND -- for the `deepspeed` launcher, whose runner would die of it and whose per-node launcher gives the
   ranks only 30 s: COMMAND is started with the stop signal ignored, which its launcher processes inherit and
   the ranks override with their own handler. SIGINT is passed to COMMAND as it is (stop now, no checkpoint);
4. exits with COMMAND's exit code, or with EXIT_CHECKPOINTED (75) when the run wrote its stop marker under
   this launch's id -- torchrun and srun report a worker that exited 75 as a plain failure.

Nothing is left running: the supervisor waits for COMMAND, and COMMAND's launcher waits for its ranks.
Only the standard library is imported (no torch), so it starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from types import FrameType
from typing import BinaryIO, Sequence

from versatune_ds.preemption import EXIT_CHECKPOINTED, LAUNCH_ID_VAR, read_stop_marker
from versatune_ds.redaction import redact_bytes

STOP_REQUESTS = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
MAX_PENDING_BYTES = 1 << 16  # output without a line end (a progress bar) is passed on at this size


def descendants(pid: int) -> list[int]:
    """Every process under `pid` (children first), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    queue = [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


class Supervisor:
    def __init__(self, command: Sequence[str], *, log: Path, run_dir: Path, forward: str, stop_signal: signal.Signals) -> None:
        self.command = list(command)
        self.log_path = log
        self.run_dir = run_dir
        self.forward = forward
        self.stop_signal = stop_signal
        self.launch_id = uuid.uuid4().hex
        self.proc: subprocess.Popen[bytes] | None = None
        self._stdout_ok = True

    def run(self) -> int:
        for sig in STOP_REQUESTS:
            signal.signal(sig, self._on_stop_request)
        signal.signal(signal.SIGINT, self._on_interrupt)
        env = {**os.environ, LAUNCH_ID_VAR: self.launch_id}
        ignore = self.stop_signal if self.forward == "tree" else None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                preexec_fn=(lambda: signal.signal(ignore, signal.SIG_IGN)) if ignore is not None else None,
            )
            assert self.proc.stdout is not None
            self._copy(self.proc.stdout, log)
            code = self.proc.wait()
        if code != 0 and read_stop_marker(self.run_dir, self.launch_id) is not None:
            return EXIT_CHECKPOINTED
        return code if code >= 0 else 128 - code

    def _copy(self, source: BinaryIO, log: BinaryIO) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(source.fileno(), 1 << 16)
            except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
                continue
            if not chunk:
                break
            pending += chunk
            cut = max(pending.rfind(b"\n"), pending.rfind(b"\r"))
            if cut < 0 and len(pending) < MAX_PENDING_BYTES:
                continue
            ready, pending = (pending[: cut + 1], pending[cut + 1 :]) if cut >= 0 else (pending, b"")
            self._emit(ready, log)
        if pending:
            self._emit(pending, log)

    def _emit(self, data: bytes, log: BinaryIO) -> None:
        clean = redact_bytes(data)
        log.write(clean)
        log.flush()
        if self._stdout_ok:
            try:
                sys.stdout.buffer.write(clean)
                sys.stdout.buffer.flush()
            except OSError:  # the terminal went away: keep the log going
                self._stdout_ok = False

    def _on_stop_request(self, signum: int, frame: FrameType | None) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        targets = [self.proc.pid] if self.forward == "child" else descendants(self.proc.pid)
        self._note(f"supervisor: got {signal.Signals(signum).name}; sending {self.stop_signal.name} to "
                   f"{'the launcher' if self.forward == 'child' else f'{len(targets)} processes of the launch'} "
                   "(the ranks checkpoint at the next step boundary and exit)")
        for pid in targets:
            try:
                os.kill(pid, self.stop_signal)
            except ProcessLookupError:
                pass

    def _on_interrupt(self, signum: int, frame: FrameType | None) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def _note(self, text: str) -> None:
        line = (text + "\n").encode()
        try:
            with open(self.log_path, "ab") as log:
                log.write(line)
        except OSError:
            pass
        if self._stdout_ok:
            try:
                sys.stderr.buffer.write(line)
                sys.stderr.buffer.flush()
            except OSError:
                pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m versatune_ds.supervisor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", required=True, type=Path, help="file the (redacted) output is appended to")
    parser.add_argument("--run-dir", required=True, type=Path, help="the run directory (where the stop marker is written)")
    parser.add_argument("--forward", choices=["child", "tree"], default="child")
    parser.add_argument("--stop-signal", default="SIGUSR1", help="signal sent on to stop with a checkpoint")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    try:
        stop_signal = signal.Signals[args.stop_signal if args.stop_signal.startswith("SIG") else f"SIG{args.stop_signal}"]
    except KeyError:
        parser.error(f"--stop-signal: unknown signal {args.stop_signal!r}")
    supervisor = Supervisor(command, log=args.log, run_dir=args.run_dir, forward=args.forward, stop_signal=stop_signal)
    return supervisor.run()


if __name__ == "__main__":
    raise SystemExit(main())
