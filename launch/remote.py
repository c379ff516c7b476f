"""Command lines that run a process on another host over OpenSSH. Pure functions: data in, argv out.
(The shell scripts, ``*_script``, also run through srun: ``launch/slurm.py``.)

Example::

    >>> argv = ssh_argv("node2", 2222, ["/opt/py/bin/python", "train.py", "--tag", "a b"],
    ...                 env={"PS_RANK": "1"}, cwd="/home/me/job")
    >>> argv[:-1]
    ['ssh', '-o', 'BatchMode=yes', '-T', '-p', '2222', '--', 'node2']
    >>> argv[-1]
    "cd /home/me/job && exec env PS_RANK=1 /opt/py/bin/python train.py --tag 'a b'"

sshd passes no environment variables (no ``AcceptEnv``) and runs the command through the remote
user's login shell, so the variables travel as ``env NAME=VALUE`` on the command line, the
interpreter is named by its absolute path, and every word is quoted with ``shlex.quote``.
"""

from __future__ import annotations

import re
import shlex
from typing import Mapping, Optional, Sequence

_UNSAFE_IN_NAME = re.compile(r"[^A-Za-z0-9_.-]")


def remote_shell_command(argv: Sequence[str], env: Mapping[str, str], cwd: str) -> str:
    """The shell command line that runs ``argv`` in ``cwd`` with ``env`` added to the environment."""
    assignments = [shlex.quote(f"{name}={value}") for name, value in env.items()]
    return " ".join(["cd", shlex.quote(cwd), "&&", "exec", "env", *assignments, shlex.join(argv)])


def ssh_argv(host: str, port: Optional[int], argv: Sequence[str], env: Mapping[str, str], cwd: str,
             ssh_config: Optional[str] = None) -> list[str]:
    """argv for the local ssh client that runs ``argv`` on ``host`` (``port`` None: ssh's default)."""
    return [*ssh_prefix(host, port, ssh_config), remote_shell_command(argv, env, cwd)]


def ssh_kill_argv(host: str, port: Optional[int], pgid: int, ssh_config: Optional[str] = None,
                  signal_name: str = "KILL") -> list[str]:
    """argv that sends a signal to a whole process group on ``host`` (the fallback when stopping)."""
    return [*ssh_prefix(host, port, ssh_config), kill_group_script(pgid, signal_name)]


def kill_group_script(pgid: int, signal_name: str = "KILL") -> str:
    """The shell command that sends a signal to a whole process group."""
    pgid = int(pgid)
    if pgid <= 1:
        raise ValueError(f"refusing to signal process group {pgid}: 'kill -- -1' would hit every process")
    return f"kill -{signal_name} -- -{pgid}"


def ssh_install_file_argv(host: str, port: Optional[int], path: str, ssh_config: Optional[str] = None) -> list[str]:
    """argv that writes its stdin to ``path`` on ``host``, readable by the user only (the job secret:
    it travels on stdin, never on a command line that ``ps`` would show)."""
    return [*ssh_prefix(host, port, ssh_config), install_file_script(path)]


def install_file_script(path: str) -> str:
    """The shell command that writes its stdin to ``path``, readable by the user only."""
    directory = path.rsplit("/", 1)[0] or "/"
    tmp = f"{path}.tmp"
    return (f"umask 077 && mkdir -p {shlex.quote(directory)} && cat > {shlex.quote(tmp)} && "
            f"mv {shlex.quote(tmp)} {shlex.quote(path)}")


def ssh_remove_file_argv(host: str, port: Optional[int], path: str, ssh_config: Optional[str] = None) -> list[str]:
    """argv that removes what ``ssh_install_file_argv`` wrote on ``host``: the file, its temporary
    name and its directory (only if nothing else is in it)."""
    return [*ssh_prefix(host, port, ssh_config), remove_file_script(path)]


def remove_file_script(path: str) -> str:
    """The shell command that removes what ``install_file_script`` wrote."""
    directory = path.rsplit("/", 1)[0] or "/"
    return f"rm -f -- {shlex.quote(path)} {shlex.quote(path + '.tmp')} && rmdir -- {shlex.quote(directory)}"


def remote_secret_path(local_path: str, host: str, port: Optional[int]) -> str:
    """Where ``host`` keeps its copy of the job secret written at ``local_path`` here: a directory
    of its own beside the local one (``/tmp/ps-launch-J-x/secret.json`` ->
    ``/tmp/ps-launch-J-x-on-HOST/secret.json``), so that hosts sharing a file system with this one
    or with each other never write, or remove, each other's copy."""
    directory, _, name = local_path.rpartition("/")
    where = _UNSAFE_IN_NAME.sub("_", host) + (f"-{port}" if port is not None else "")
    return f"{directory}-on-{where}/{name}"


def ssh_prefix(host: str, port: Optional[int], ssh_config: Optional[str] = None) -> list[str]:
    """``ssh [-F FILE] -o BatchMode=yes -T [-p PORT] -- HOST``: never prompts, never allocates a tty."""
    argv = ["ssh"]
    if ssh_config:
        argv += ["-F", ssh_config]
    # BatchMode: a password prompt would hang the launcher; -T: a tty would turn our pipes into a terminal.
    argv += ["-o", "BatchMode=yes", "-T"]
    if port is not None:
        argv += ["-p", str(port)]
    # "--" so that a host name starting with "-" can never be read as an ssh option
    return [*argv, "--", host]


__all__ = ["install_file_script", "kill_group_script", "remote_secret_path", "remote_shell_command",
           "remove_file_script", "ssh_argv", "ssh_install_file_argv", "ssh_kill_argv", "ssh_prefix",
           "ssh_remove_file_argv"]
