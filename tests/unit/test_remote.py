"""The ssh command lines ps-launch builds (launch/remote.py): pure functions, no ssh is run."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from psframework.launch.remote import (remote_secret_path, remote_shell_command, ssh_argv, ssh_install_file_argv,
                                      ssh_kill_argv, ssh_prefix, ssh_remove_file_argv)

PY = "/opt/py 3/bin/python"


def test_prefix_is_batch_mode_without_tty_and_ends_options_before_the_host():
    assert ssh_prefix("node1", None) == ["ssh", "-o", "BatchMode=yes", "-T", "--", "node1"]


def test_port_and_config_file():
    argv = ssh_prefix("10.0.0.2", 2222, "/tmp/my ssh/config")
    assert argv == ["ssh", "-F", "/tmp/my ssh/config", "-o", "BatchMode=yes", "-T", "-p", "2222", "--", "10.0.0.2"]


def test_ipv6_host_is_passed_bare():
    assert ssh_prefix("fe80::1", 22)[-1] == "fe80::1"


def test_remote_command_is_the_last_single_argument():
    argv = ssh_argv("node1", 22, [PY, "-m", "psframework.launch.remote_child", "--", "python", "train.py"],
                    env={"PS_RANK": "1"}, cwd="/work/job")
    assert argv[:-1] == ["ssh", "-o", "BatchMode=yes", "-T", "-p", "22", "--", "node1"]
    assert argv[-1] == ("cd /work/job && exec env PS_RANK=1 '/opt/py 3/bin/python' -m psframework.launch.remote_child -- "
                        "python train.py")


def test_cwd_env_and_argv_survive_the_remote_shell():
    env = {"PS_TEST_A": "has space", "PS_TEST_B": "it's \"quoted\" $HOME `x` ;|&", "EMPTY": ""}
    argv = ["printf", "%s\\n", "a b", "$(id)", "*", "--flag=';'"]
    command = remote_shell_command(argv, env, "/tmp/dir with space")
    words = shlex.split(command)
    assert words[:3] == ["cd", "/tmp/dir with space", "&&"]
    assert words[3:5] == ["exec", "env"]
    assert words[5:8] == ["PS_TEST_A=has space", "PS_TEST_B=it's \"quoted\" $HOME `x` ;|&", "EMPTY="]
    assert words[8:] == argv


def test_a_real_shell_runs_it_exactly(tmp_path):
    workdir = tmp_path / "a dir; with $stuff"
    workdir.mkdir()
    env = {"PS_TEST_X": "va'l $(echo no)"}
    probe = ["sh", "-c", 'pwd; printf "%s|" "$PS_TEST_X" "$@"', "sh", "one two", "$HOME"]
    command = remote_shell_command(probe, env, str(workdir))
    out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout
    assert out == f"{workdir}\nva'l $(echo no)|one two|$HOME|"


def test_empty_env_still_runs():
    assert remote_shell_command(["true"], {}, "/") == "cd / && exec env true"


def test_kill_fallback_signals_the_whole_group():
    argv = ssh_kill_argv("node3", 2200, 4242, "/cfg")
    assert argv[:-1] == ssh_prefix("node3", 2200, "/cfg")
    assert argv[-1] == "kill -KILL -- -4242"
    assert ssh_kill_argv("n", None, 7, signal_name="TERM")[-1] == "kill -TERM -- -7"


@pytest.mark.parametrize("bad", ["7; rm -rf /", 1, 0, -5])
def test_kill_fallback_takes_only_a_real_group(bad):
    with pytest.raises(ValueError):
        ssh_kill_argv("n", None, bad)  # type: ignore[arg-type]


def test_each_host_gets_its_own_copy_of_the_secret_beside_the_local_one():
    local = "/tmp/ps-launch-j1-abc/secret.json"
    assert remote_secret_path(local, "10.0.0.2", None) == "/tmp/ps-launch-j1-abc-on-10.0.0.2/secret.json"
    assert remote_secret_path(local, "node2", 2222) == "/tmp/ps-launch-j1-abc-on-node2-2222/secret.json"
    # whatever the host is called, the copy stays one plain directory next to the local one
    assert remote_secret_path(local, "me@fe80::1%eth0", None) == "/tmp/ps-launch-j1-abc-on-me_fe80__1_eth0/secret.json"


def test_the_secret_is_installed_and_removed_by_a_real_shell(tmp_path):
    path = str(tmp_path / "ps-launch-j1-on-h" / "secret.json")
    install = ssh_install_file_argv("h", None, path)[-1]
    subprocess.run(["sh", "-c", install], input=b"s3cret", check=True)
    assert Path(path).read_bytes() == b"s3cret" and oct(Path(path).parent.stat().st_mode & 0o777) == "0o700"
    remove = ssh_remove_file_argv("h", 22, path, "/cfg")
    assert remove[:-1] == ["ssh", "-F", "/cfg", "-o", "BatchMode=yes", "-T", "-p", "22", "--", "h"]
    subprocess.run(["sh", "-c", remove[-1]], check=True)
    assert not Path(path).parent.exists() and tmp_path.exists()
