"""Throwaway Slurm clusters for the `slurm` test tier (root only, Debian/Ubuntu).

Two context managers:

- `single_node_cluster(scratch)`: munged + slurmctld + one slurmd in the root network namespace.
- `two_node_cluster(scratch)`: two network namespaces joined by a veth pair, each with its own
  hostname (`nodeA`, `nodeB`) and hosts file; slurmctld + slurmd in A, slurmd in B, one shared munged.

Both install `slurm-wlm munge` with apt-get when missing, keep every file under `scratch`, and tear
down what they started (jobs, daemons, namespaces, veths, cgroup dirs) even when bring-up or the test
fails. The recipe and its pitfalls are measured in docs/SLURM_NETNS.md; the comments here say why
each step is there. Nothing outside the machine is contacted: the namespaces have no route out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

logger = logging.getLogger(__name__)

SUBNET_PREFIX = "10.231.0"  # only ever configured inside our own namespaces
DAEMON_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "srun")
FINISHED_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
)


class ClusterUnavailable(Exception):
    """This machine cannot host the cluster (not root, no iproute2, apt refused); tests skip."""


def unavailable_reason() -> str | None:
    """Why a cluster cannot be brought up here, or None when it can."""
    if os.geteuid() != 0:
        return "the Slurm tier needs root (it starts daemons, network namespaces and installs packages)"
    for tool in ("ip", "nsenter", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"the Slurm tier needs `{tool}` on PATH (util-linux / iproute2)"
    if not Path("/sys/fs/cgroup").is_dir():
        return "slurmd 22.05 needs a cgroup filesystem at /sys/fs/cgroup"
    return None


def ensure_slurm_installed(log_path: Path) -> None:
    """apt-get install slurm-wlm and munge unless their binaries are already on PATH."""
    if all(shutil.which(b) for b in DAEMON_BINARIES):
        return
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable("slurm-wlm/munge are missing and there is no apt-get to install them")
    # A policy-rc.d that exits 101 stops the packages' postinst from starting system-wide munged /
    # slurmd services, which we would then have to find and stop.
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = not policy.exists()
    if made_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-o", "DPkg::Lock::Timeout=120", "slurm-wlm", "munge"]
    try:
        with log_path.open("a") as log:
            done = subprocess.run(install, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=600)
            if done.returncode != 0:  # a stale package index is the usual cause
                subprocess.run(["apt-get", "update"], env=env, stdout=log, stderr=subprocess.STDOUT, timeout=300)
                done = subprocess.run(install, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=600)
    finally:
        if made_policy:
            policy.unlink()
    if done.returncode != 0 or not all(shutil.which(b) for b in DAEMON_BINARIES):
        tail = log_path.read_text()[-1500:]
        raise ClusterUnavailable(f"apt-get could not install slurm-wlm munge (log {log_path}):\n{tail}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class SlurmCluster:
    """A running cluster. Client commands run through `client_prefix` (a namespace wrapper or nothing)."""

    scratch: Path
    conf: Path
    munge_socket: Path
    node_names: tuple[str, ...]
    client_prefix: tuple[str, ...] = ()
    netns_by_node: dict[str, str] = field(default_factory=dict)

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment for clients and for jobs (sbatch exports it into the job)."""
        return {**os.environ, "SLURM_CONF": str(self.conf), **(extra or {})}

    def client(
        self, argv: Sequence[str], *, env: dict[str, str] | None = None, timeout_s: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*self.client_prefix, *argv], env=env or self.env(), capture_output=True, text=True, timeout=timeout_s
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def sbatch(
        self, script: Path, script_args: Sequence[str] = (), *, sbatch_args: Sequence[str] = (), env: dict[str, str]
    ) -> int:
        done = self.client(["sbatch", "--parsable", *sbatch_args, str(script), *script_args], env=env)
        return int(done.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, ExitCode, NodeList, ...)."""
        text = self.client(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        info: dict[str, str] = {}
        for token in text.split():
            key, sep, value = token.partition("=")
            if sep and key not in info:
                info[key] = value
        return info

    def wait_job(self, job_id: int, timeout_s: float) -> dict[str, str]:
        """Poll until the job is in a final state; raise TimeoutError (with its info) when it is not."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.job_info(job_id)
            if info.get("JobState") in FINISHED_STATES:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout_s}s: {info}")
            time.sleep(0.5)

    def pids_on_node(self, node: str) -> list[int]:
        """PIDs whose network namespace is `node`'s (two-node cluster only)."""
        return _pids_in_netns(self.netns_by_node[node])

    def log_tail(self, chars: int = 3000) -> str:
        parts = []
        for path in sorted((self.scratch / "log").glob("*")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# bring-up pieces; each registers its own teardown on the ExitStack before it can fail


def _start_daemon(stack: contextlib.ExitStack, argv: Sequence[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start a foreground daemon in its own session; stop it (TERM, then KILL) on teardown."""
    out = log.open("ab")
    proc = subprocess.Popen(
        list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    out.close()
    stack.callback(_stop_process, proc)
    return proc


def _stop_process(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        # slurmd ignored SIGTERM for 20 s+ when munged was gone (SLURM_NETNS.md §1)
        proc.kill()
        proc.wait(timeout=10)


def _start_munge(stack: contextlib.ExitStack, scratch: Path) -> Path:
    # munged refuses a socket whose every ancestor directory is not world-executable, and pytest's
    # tmp dirs are 0700, so the munge dir lives directly under /tmp (removed on teardown).
    munge_dir = Path(tempfile.mkdtemp(prefix="vtds-munge-", dir="/tmp"))
    stack.callback(shutil.rmtree, munge_dir, ignore_errors=True)
    munge_dir.chmod(0o755)
    key = munge_dir / "munge.key"
    socket_path = munge_dir / "munge.socket.2"
    subprocess.run(["mungekey", "--create", f"--keyfile={key}", "--force"], check=True, capture_output=True)
    key.chmod(0o600)
    argv = [
        "munged", "--foreground", f"--key-file={key}", f"--socket={socket_path}",
        f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
        f"--seed-file={munge_dir / 'munged.seed'}",
    ]  # fmt: skip
    munged = _start_daemon(stack, argv, scratch / "log" / "munged.out", dict(os.environ))
    # Slurm clients stall ~2 s per call while munged is not answering; wait until it does.
    deadline = time.monotonic() + 20
    while True:
        cred = subprocess.run(["munge", "-n", f"--socket={socket_path}"], capture_output=True)
        check = subprocess.run(["unmunge", f"--socket={socket_path}"], input=cred.stdout, capture_output=True)
        if check.returncode == 0:
            return socket_path
        if munged.poll() is not None or time.monotonic() > deadline:
            log = (scratch / "log" / "munged.out").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"munged did not answer: {check.stderr.decode(errors='replace')}\n{log}")
        time.sleep(0.1)


def _slurm_conf(scratch: Path, munge_socket: Path, controller: str, ctld_port: int, slurmd_port: int, nodes: str) -> str:
    # proctrack/linuxproc + task/none: no cgroup.conf, and tasks stay in the sandbox's own cgroups.
    # KillWait=2 so a failed/cancelled step is SIGKILLed quickly; EnforcePartLimits=ALL so an
    # oversized job fails at submission instead of pending forever. config_overrides lets a node
    # declare CPUs that differ from the hardware (each namespace "node" takes one of the cores).
    return textwrap.dedent(
        f"""\
        ClusterName=vtds
        SlurmctldHost={controller}
        SlurmUser=root
        SlurmdUser=root
        AuthType=auth/munge
        CredType=cred/munge
        AuthInfo=socket={munge_socket}
        SlurmctldPort={ctld_port}
        SlurmdPort={slurmd_port}
        StateSaveLocation={scratch}/state
        SlurmdSpoolDir={scratch}/spool/%n
        SlurmctldPidFile={scratch}/slurmctld.pid
        SlurmdPidFile={scratch}/slurmd.%n.pid
        SlurmctldLogFile={scratch}/log/slurmctld.log
        SlurmdLogFile={scratch}/log/slurmd.%n.log
        ProctrackType=proctrack/linuxproc
        TaskPlugin=task/none
        JobAcctGatherType=jobacct_gather/none
        AccountingStorageType=accounting_storage/none
        JobCompType=jobcomp/none
        MpiDefault=none
        MailProg=/bin/true
        SelectType=select/cons_tres
        SelectTypeParameters=CR_Core
        SchedulerType=sched/backfill
        ReturnToService=2
        EnforcePartLimits=ALL
        SlurmdParameters=config_overrides
        KillWait=2
        MinJobAge=600
        {nodes}
        """
    )


def _wait_nodes_idle(cluster: SlurmCluster, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        done = cluster.client(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, timeout_s=30)
        states = dict(line.split() for line in done.stdout.splitlines() if line.strip())
        if all(states.get(node) == "idle" for node in cluster.node_names):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"nodes not idle after {timeout_s}s: {states} {done.stderr}\n{cluster.log_tail()}")
        time.sleep(0.3)


def _shutdown_slurm(cluster: SlurmCluster, daemons: Sequence[subprocess.Popen]) -> None:
    """Cancel our jobs, then `scontrol shutdown`; the Popen stop callbacks catch what is left."""
    with contextlib.suppress(Exception):
        queue = cluster.client(["squeue", "-h", "-o", "%i"], check=False, timeout_s=20).stdout.split()
        if queue:
            cluster.client(["scancel", *queue], check=False, timeout_s=20)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and cluster.client(["squeue", "-h"], check=False).stdout.strip():
                time.sleep(0.5)
    with contextlib.suppress(Exception):
        cluster.client(["scontrol", "shutdown"], check=False, timeout_s=20)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(proc.poll() is None for proc in daemons):
        time.sleep(0.2)


def _kill_job_leftovers(conf: Path) -> None:
    """SIGKILL any process still carrying our SLURM_CONF (job steps orphaned by a failed shutdown)."""
    marker = f"SLURM_CONF={conf}".encode()
    for pid in _all_pids():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _all_pids() -> list[int]:
    me = os.getpid()
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and int(p.name) != me]


def _pids_in_netns(netns: str) -> list[int]:
    target = os.stat(f"/run/netns/{netns}").st_ino
    pids = []
    for pid in _all_pids():
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino == target:
                pids.append(pid)
        except OSError:
            continue
    return pids


def _cgroup_dirs() -> set[Path]:
    """Top-level slurm* dirs in the cgroup controllers (slurmd may create them even with linuxproc)."""
    return {d for d in Path("/sys/fs/cgroup").glob("*/slurm*") if d.is_dir()}


def _remove_new_cgroups(before: set[Path]) -> None:
    for top in _cgroup_dirs() - before:
        # cgroup dirs are removed leaf-first with rmdir; their pseudo-files go with them.
        for sub in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                sub.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


# ---------------------------------------------------------------------------------------------
# the two clusters


def _prepare(scratch: Path) -> None:
    """Refuse early where no cluster can run here; make the scratch folder and install Slurm if missing."""
    reason = unavailable_reason()
    if reason:
        raise ClusterUnavailable(reason)
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "log").mkdir(exist_ok=True)
    ensure_slurm_installed(scratch / "log" / "apt.log")


@contextlib.contextmanager
def single_node_cluster(scratch: Path) -> Iterator[SlurmCluster]:
    """A one-node cluster (`CPUs=2`) in the root network namespace."""
    _prepare(scratch)
    node = socket.gethostname().split(".")[0]
    with contextlib.ExitStack() as stack:
        stack.callback(_remove_new_cgroups, _cgroup_dirs())
        for sub in ("state", f"spool/{node}"):
            (scratch / sub).mkdir(parents=True, exist_ok=True)
        munge_socket = _start_munge(stack, scratch)
        conf = scratch / "slurm.conf"
        nodes = (
            f"NodeName={node} NodeAddr=127.0.0.1 CPUs=2 RealMemory=2000 State=UNKNOWN\n"
            f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP"
        )
        conf.write_text(_slurm_conf(scratch, munge_socket, f"{node}(127.0.0.1)", free_port(), free_port(), nodes))
        cluster = SlurmCluster(scratch=scratch, conf=conf, munge_socket=munge_socket, node_names=(node,))
        stack.callback(_kill_job_leftovers, conf)
        env = cluster.env()
        log = scratch / "log"
        ctld = _start_daemon(stack, ["slurmctld", "-D", "-c", "-f", str(conf)], log / "slurmctld.out", env)
        slurmd = _start_daemon(stack, ["slurmd", "-D", "-N", node, "-f", str(conf)], log / f"slurmd.{node}.out", env)
        stack.callback(_shutdown_slurm, cluster, (ctld, slurmd))
        _wait_nodes_idle(cluster)
        yield cluster


@contextlib.contextmanager
def two_node_cluster(scratch: Path) -> Iterator[SlurmCluster]:
    """Two namespace "hosts" nodeA (10.231.0.1, controller) and nodeB (10.231.0.2), `CPUs=1` each."""
    _prepare(scratch)
    tag = f"vtds{os.getpid() % 100000}"  # unique per test process; veth names must stay <= 15 chars
    nodes = {"nodeA": (f"{tag}a", f"{SUBNET_PREFIX}.1"), "nodeB": (f"{tag}b", f"{SUBNET_PREFIX}.2")}
    with contextlib.ExitStack() as stack:
        stack.callback(_remove_new_cgroups, _cgroup_dirs())
        _make_namespaces(stack, nodes)
        hosts = scratch / "hosts"
        hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{ip} {name}\n" for name, (_, ip) in nodes.items()))
        innode = _write_innode(scratch, hosts, {name: ns for name, (ns, _) in nodes.items()})
        for sub in ("state", "spool/nodeA", "spool/nodeB"):  # %n spool dirs must exist beforehand
            (scratch / sub).mkdir(parents=True, exist_ok=True)
        # One munged serves both namespaces: its unix socket is a path, not scoped to a netns.
        munge_socket = _start_munge(stack, scratch)
        conf = scratch / "slurm.conf"
        node_lines = "".join(
            f"NodeName={name} NodeAddr={ip} CPUs=1 RealMemory=2000 State=UNKNOWN\n" for name, (_, ip) in nodes.items()
        )
        node_lines += "PartitionName=debug Nodes=nodeA,nodeB Default=YES MaxTime=INFINITE State=UP"
        conf.write_text(_slurm_conf(scratch, munge_socket, f"nodeA({SUBNET_PREFIX}.1)", 6817, 6818, node_lines))
        cluster = SlurmCluster(
            scratch=scratch,
            conf=conf,
            munge_socket=munge_socket,
            node_names=tuple(nodes),
            # the root namespace cannot reach 10.231.0.x (its default route goes to an egress proxy
            # that answers anything), so clients run inside nodeA
            client_prefix=(str(innode), "nodeA"),
            netns_by_node={name: ns for name, (ns, _) in nodes.items()},
        )
        stack.callback(_kill_job_leftovers, conf)
        stack.callback(_kill_netns_processes, [ns for ns, _ in nodes.values()])
        env = cluster.env()
        log = scratch / "log"
        daemons = [_start_daemon(stack, [str(innode), "nodeA", "slurmctld", "-D", "-c", "-f", str(conf)],
                                 log / "slurmctld.out", env)]  # fmt: skip
        for name in nodes:
            argv = [str(innode), name, "slurmd", "-D", "-N", name, "-f", str(conf)]
            daemons.append(_start_daemon(stack, argv, log / f"slurmd.{name}.out", env))
        stack.callback(_shutdown_slurm, cluster, daemons)
        _wait_nodes_idle(cluster)
        yield cluster


def _make_namespaces(stack: contextlib.ExitStack, nodes: dict[str, tuple[str, str]]) -> None:
    (ns_a, ip_a), (ns_b, ip_b) = nodes.values()
    for ns in (ns_a, ns_b):
        _ip("netns", "add", ns)
        stack.callback(_ip_quiet, "netns", "del", ns)  # deleting a netns deletes the veth end inside it
    # both ends are created in the root namespace and moved at once, so nothing is left behind there
    _ip("link", "add", ns_a, "type", "veth", "peer", "name", ns_b)
    stack.callback(_ip_quiet, "link", "del", ns_a)  # only matters if moving it failed
    for ns, ip in ((ns_a, ip_a), (ns_b, ip_b)):
        _ip("link", "set", ns, "netns", ns)
        _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "link", "set", ns, "up")


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _ip_quiet(*args: str) -> None:
    subprocess.run(["ip", *args], capture_output=True)


def _kill_netns_processes(namespaces: Sequence[str]) -> None:
    for ns in namespaces:
        with contextlib.suppress(OSError):
            for pid in _pids_in_netns(ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _write_innode(scratch: Path, hosts: Path, netns_by_node: dict[str, str]) -> Path:
    """`innode NODE cmd...`: run cmd in NODE's network namespace with its own hostname and /etc/hosts.

    Not `ip netns exec`: that remounts /sys, hiding /sys/fs/cgroup, and slurmd then refuses to start.
    `unshare --mount` makes the bind mount of the hosts file private to the command.
    """
    cases = "".join(f"  {node}) ns={ns} ;;\n" for node, ns in netns_by_node.items())
    script = scratch / "innode"
    script.write_text(
        "#!/bin/sh\n"
        "node=$1; shift\n"
        f'case "$node" in\n{cases}  *) echo "innode: unknown node $node" >&2; exit 2 ;;\nesac\n'
        f'exec nsenter --net=/run/netns/$ns unshare --uts --mount sh -c \\\n'
        f'  \'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"\' {hosts} "$node" "$@"\n'
    )
    script.chmod(0o755)
    return script


# ---------------------------------------------------------------------------------------------
# a stand-in for `python -m versatune_ds train`, to prove launchers and clusters without the real
# trainer: same argv and environment contract, an all_reduce per "step" (gloo; NCCL on a GPU), the
# same outputs.

STANDIN_MAIN = '''\
"""Stand-in `versatune_ds train`: rank/world from the launcher's env, one all_reduce per step."""
import datetime, json, os, socket, subprocess, sys, time
from pathlib import Path

import torch
import torch.distributed as dist

args = sys.argv[1:]
assert args and args[0] == "train", f"stand-in: expected `train`, got {args}"
overrides = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("-"))
resume = "--resume" in args and args[args.index("--resume") + 1] == "auto"
run_dir = Path(overrides["train.run_dir"])
max_steps = int(overrides.get("train.max_steps", "4"))
sleep_s = float(overrides.get("standin.step_sleep_s", "0"))
timeout_s = float(overrides.get("dist.timeout_s", "60"))

env = os.environ
if "RANK" in env:
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
else:  # srun: map SLURM_* like the real CLI
    rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    if "MASTER_ADDR" not in env:
        out = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], capture_output=True, text=True)
        env["MASTER_ADDR"] = out.stdout.split()[0]
    env.setdefault("MASTER_PORT", "29500")
local_rank = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", "0")))
backend = overrides.get("dist.backend", "auto")
if backend == "auto":
    backend = "nccl" if torch.cuda.is_available() else "gloo"
device = torch.device(f"cuda:{local_rank}" if backend == "nccl" else "cpu")
if backend == "nccl":
    torch.cuda.set_device(device)
dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
hosts = [None] * world
dist.all_gather_object(hosts, socket.gethostname())

start = 0
latest = run_dir / "checkpoints" / "latest"
if resume and latest.exists():
    start = int(latest.read_text().split("_")[1])
if rank == 0:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"event": "start", "hosts": hosts, "world_size": world, "resumed_from": start,
                            "backend": backend, "accelerator": env.get("DS_ACCELERATOR")}) + "\\n")
for step in range(start + 1, max_steps + 1):
    value = torch.tensor([float(rank + 1)], device=device)
    dist.all_reduce(value)
    assert value.item() == world * (world + 1) / 2, value
    if rank == 0:
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "train/loss": 1.0 / step}) + "\\n")
        tag = f"step_{step:06d}"
        (run_dir / "checkpoints" / tag).mkdir(parents=True, exist_ok=True)
        latest.write_text(tag)
    dist.barrier()
    time.sleep(sleep_s)
if rank == 0:
    (run_dir / "final").mkdir(exist_ok=True)
    (run_dir / "final" / "config.json").write_text("{}")
    (run_dir / "final" / "model.safetensors").write_bytes(b"")
dist.destroy_process_group()
'''


# The real modules the launchers need besides the trainer: launchers/common.sh runs the launch command
# under versatune_ds.supervisor (secrets filter, signal forwarding), which imports these.
REAL_REPO = Path(__file__).resolve().parents[1]
LAUNCH_MODULES = ("supervisor.py", "redaction.py", "preemption.py", "files.py")


def write_standin_package(root: Path) -> Path:
    """Write `root/versatune_ds/` (the stand-in) and `root/launchers/common.sh`; run launchers with REPO_DIR=root
    and cwd=root."""
    package = root / "versatune_ds"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(STANDIN_MAIN)
    for name in LAUNCH_MODULES:
        shutil.copy2(REAL_REPO / "versatune_ds" / name, package / name)
    (root / "launchers").mkdir(exist_ok=True)
    shutil.copy2(REAL_REPO / "launchers" / "common.sh", root / "launchers" / "common.sh")
    return root
