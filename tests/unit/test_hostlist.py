"""Slurm host lists and task counts: our expander, and (where Slurm's client is installed) the same
shapes through ``scontrol show hostnames``."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from psframework.launch.hostlist import expand_hostlist, expand_tasks_per_node
from psframework.errors import ConfigError

SHAPES = [
    "n1", "n[01-03,07],gpu4", "n[1-10]", "n[8-12],n[01-2]", "n[009-11]", "n[1-02]", "n0[1-3]",
    "a[1-2]b[3-4]", "rack[1-2]-n[1-2]", "n[1-2][3-4]", "[1-3]", "n[1,1]", "n[2-2]", "n[5]",
    "n1,,n2", "n[1-2],", "a,b c", "node-1.example.com,x[1-3,5-6,9]", "n[01-100]",
]
BAD = ["n[1-3", "n1-3]", "n[[1]]", "n[]", "n[a-b]", "n[-3]", "n[3-1]", "n[1x]", "a[1-2]c", "n[1-3,5-6]x",
       "n[1-9999999]"]


@pytest.mark.parametrize("text, expected", [
    ("n[01-03,07],gpu4", ["n01", "n02", "n03", "n07", "gpu4"]),
    ("n[009-11]", ["n009", "n010", "n011"]),
    ("n[1-02]", ["n1", "n2"]),
    ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),
    ("n1,,n2 n3", ["n1", "n2", "n3"]),
    ("", []),
])
def test_expand_hostlist(text, expected):
    assert expand_hostlist(text) == expected


@pytest.mark.parametrize("text", BAD)
def test_bad_hostlist_is_refused_with_the_list_named(text):
    with pytest.raises(ConfigError, match="host list"):
        expand_hostlist(text)


@pytest.mark.parametrize("text, expected", [
    ("2(x3),1", [2, 2, 2, 1]), ("4", [4]), ("1,2(x1),3", [1, 2, 3]),
])
def test_expand_tasks_per_node(text, expected):
    assert expand_tasks_per_node(text) == expected


@pytest.mark.parametrize("text", ["", "2(x0)", "2x3", "2(3)", "a", "2(x3),"])
def test_bad_tasks_per_node(text):
    with pytest.raises(ConfigError, match="tasks per node"):
        expand_tasks_per_node(text)


@pytest.fixture(scope="module")
def scontrol(tmp_path_factory):
    if shutil.which("scontrol") is None:
        pytest.skip("scontrol not installed (Debian: slurm-client; make sysdeps installs it as root)")
    conf = tmp_path_factory.mktemp("slurm") / "slurm.conf"
    # show hostnames needs a configuration to read, not a running controller
    conf.write_text("ClusterName=hostlist\nSlurmctldHost=localhost\nNodeName=n1\nPartitionName=p Nodes=n1\n")
    env = {**os.environ, "SLURM_CONF": str(conf)}

    def show(text: str) -> subprocess.CompletedProcess:
        return subprocess.run(["scontrol", "show", "hostnames", text], env=env, capture_output=True,
                              text=True, timeout=30)
    return show


@pytest.mark.parametrize("text", SHAPES)
def test_same_hosts_as_scontrol(scontrol, text):
    done = scontrol(text)
    assert done.returncode == 0, done.stderr
    assert expand_hostlist(text) == done.stdout.split()


# scontrol reads unbalanced brackets leniently, and would expand n[1-9999999] (we stop at a million names)
LENIENT_IN_SLURM = ("n[1-3", "n1-3]", "n[1-9999999]")


@pytest.mark.parametrize("text", [t for t in BAD if t not in LENIENT_IN_SLURM])
def test_scontrol_refuses_what_we_refuse(scontrol, text):
    done = scontrol(text)
    assert "Invalid hostlist" in done.stdout + done.stderr or done.returncode != 0
