"""Faults around checkpoints and models the engine must turn into one clear message: a rank that stops answering
while a checkpoint is being saved (the survivor's collective times out inside DeepSpeed's save).

This file is also the test-side wrapper that makes one rank hang in a save without any hook in product code:
`python tests/test_checkpoint_faults.py hang <save number> <rank> -- <versatune-ds args>`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_helpers import REPO, free_port, kill_tree, launch_env, write_run_config  # noqa: E402

THIS_FILE = Path(__file__).resolve()
TIMEOUT_S = 20
SURVIVOR_SLACK_S = 90  # interpreter + DeepSpeed shutdown on a loaded 2-core machine


def _hang_in_save(save_number: int, hang_rank: int, argv: list[str]) -> int:
    """Rank `hang_rank` stops answering inside its `save_number`-th checkpoint save (after DeepSpeed started it)."""
    import versatune_ds.engine.train_engine as engine_module
    from versatune_ds import cli

    rank = int(os.environ.get("RANK", "0"))
    original = engine_module.TrainEngine.save
    count = {"saves": 0}

    def save(self, directory, tag, client_state):  # type: ignore[no-untyped-def]
        count["saves"] += 1
        if count["saves"] == save_number and rank == hang_rank:
            time.sleep(3600)  # a hung rank (deadlock, stuck file system): it never reaches the save's collectives
        return original(self, directory, tag, client_state)

    engine_module.TrainEngine.save = save
    return cli.main(argv)


@pytest.mark.dist
def test_a_rank_hanging_during_a_save_gives_the_lost_rank_message(tmp_path: Path, tiny_model_dir: Path) -> None:
    import subprocess

    run_dir = tmp_path / "run"
    config = write_run_config(
        tmp_path, tiny_model_dir, run_dir, train={"max_steps": 8}, checkpoint={"every": 2, "keep_last": 2},
        dist={"timeout_s": TIMEOUT_S}, export={"at_end": False},
    )
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = launch_env({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                          "MASTER_PORT": str(port)})
        log = tmp_path / f"rank{rank}.log"
        command = [sys.executable, str(THIS_FILE), "hang", "2", "1", "--", "train", "--config", str(config)]
        with open(log, "w") as handle:
            procs.append((subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                           start_new_session=True), log))
    survivor, survivor_log = procs[0]
    try:
        code = survivor.wait(timeout=300 + TIMEOUT_S + SURVIVOR_SLACK_S)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait()
    out = survivor_log.read_text(errors="replace")
    assert code == 2, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    assert "lost contact with another rank" in out and "--resume auto" in out, out[-4000:]
    # The first checkpoint (step 2) is complete; the one being saved when the rank hung is not used.
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"


if __name__ == "__main__":
    if len(sys.argv) < 5 or sys.argv[1] != "hang" or sys.argv[4] != "--":
        raise SystemExit("usage: test_checkpoint_faults.py hang <save number> <rank> -- <versatune-ds args>")
    sys.path.insert(0, str(REPO))
    raise SystemExit(_hang_in_save(int(sys.argv[2]), int(sys.argv[3]), sys.argv[5:]))
