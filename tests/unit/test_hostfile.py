"""Hostfile parsing, host:port splitting and local-host detection."""

from __future__ import annotations

import socket

import pytest

from psframework.launch import hosts as hosts_mod
from psframework.launch.hostfile import HostEntry, parse_hostfile, read_hostfile
from psframework.launch.hosts import is_local_host, join_host_port, split_host_port
from psframework.errors import ConfigError

EXAMPLE = """\
# comments and blank lines are ignored

node1          slots=4 servers=1   # 4 workers and 1 server
node2:2222     slots=4             # ssh port 2222
10.0.0.3       servers=2           # a server-only host
[::1]:22 slots=1                   # IPv6 in brackets when a port follows
"""


def parse_error(text: str, path: str = "hosts.txt") -> str:
    with pytest.raises(ConfigError) as info:
        parse_hostfile(text, path)
    return str(info.value)


# --- parse_hostfile: valid input ---------------------------------------------------------------

def test_example_parses_to_expected_entries():
    assert parse_hostfile(EXAMPLE, "hosts.txt") == (
        HostEntry("node1", None, 4, 1, 3),
        HostEntry("node2", 2222, 4, 0, 4),
        HostEntry("10.0.0.3", None, 0, 2, 5),
        HostEntry("::1", 22, 1, 0, 6),
    )


def test_bare_host_has_one_slot():
    assert parse_hostfile("node1\n") == (HostEntry("node1", None, 1, 0, 1),)


def test_slots_zero_with_servers_is_server_only():
    assert parse_hostfile("node1 slots=0 servers=3") == (HostEntry("node1", None, 0, 3, 1),)


def test_bare_ipv6_without_port():
    assert parse_hostfile("fe80::1 slots=2") == (HostEntry("fe80::1", None, 2, 0, 1),)


def test_keys_in_any_order_and_tabs_and_crlf():
    text = "node1\tservers=2\tslots=3\r\nnode2 slots=1\r\n"
    assert parse_hostfile(text) == (HostEntry("node1", None, 3, 2, 1), HostEntry("node2", None, 1, 0, 2))


def test_same_host_on_different_ports_is_allowed():
    entries = parse_hostfile("node1:2222\nnode1:2223\n")
    assert [e.ssh_port for e in entries] == [2222, 2223]


def test_entry_address():
    assert HostEntry("::1", 22, 1, 0, 1).address == "[::1]:22"
    assert HostEntry("node1", None, 1, 0, 1).address == "node1"


# --- parse_hostfile: errors name file, line and problem -----------------------------------------

def test_unknown_key():
    msg = parse_error("node0\n\nnode1 slot=4\n")
    assert msg.startswith("hosts.txt:3: unknown key 'slot' (known keys: slots, servers)")
    assert "did you mean 'slots'" in msg


def test_max_slots_is_unknown_key():
    assert parse_error("node1 max_slots=4").startswith("hosts.txt:1: unknown key 'max_slots'")


@pytest.mark.parametrize("value", ["four", "4.5", "", "0x4", "+4", "4_0"])
def test_non_integer_number(value):
    msg = parse_error(f"node1 slots={value}")
    assert msg.startswith("hosts.txt:1: bad number")
    assert "not a whole number" in msg and "slots=4" in msg


def test_negative_number():
    msg = parse_error("node1\nnode2 servers=-1")
    assert msg.startswith("hosts.txt:2: bad number in 'servers=-1'")
    assert "negative" in msg


@pytest.mark.parametrize("line", ["node1 slots=0 servers=0", "node1 slots=0", "node1 servers=0"])
def test_host_offering_nothing(line):
    msg = parse_error(line)
    assert msg.startswith("hosts.txt:1: host 'node1' has slots=0 and servers=0")
    assert "give it slots=N or servers=N, or delete the line" in msg


def test_duplicate_key():
    msg = parse_error("node1 slots=4 slots=2")
    assert msg.startswith("hosts.txt:1: key 'slots' given twice")
    assert "keep only one" in msg


@pytest.mark.parametrize("text", ["node1\nnode2\nnode1 slots=2\n", "NODE1\nnode2\nnode1\n",
                                  "::1\nnode2\n0::1\n"])
def test_duplicate_host_names_both_lines(text):
    msg = parse_error(text)
    assert msg.startswith("hosts.txt:3: host ")
    assert "listed twice, on lines 1 and 3" in msg and "merge" in msg


def test_duplicate_host_with_port():
    msg = parse_error("node1:2222\nnode1:2222 slots=2")
    assert "hosts.txt:2: host 'node1:2222' is listed twice, on lines 1 and 2" in msg


@pytest.mark.parametrize("host,problem", [
    ("node1:ssh", "bad port 'ssh'"),
    ("node1:0", "bad port 0"),
    ("node1:65536", "bad port 65536"),
    ("node1:", "bad port ''"),
    ("[::1]:x", "bad port 'x'"),
])
def test_bad_port(host, problem):
    msg = parse_error(f"node0\n{host} slots=1")
    assert msg.startswith(f"hosts.txt:2: {problem}")
    assert "1 to 65535" in msg


@pytest.mark.parametrize("token", ["slots", "=4", "slots:4"])
def test_malformed_token(token):
    msg = parse_error(f"node1 {token}")
    assert msg.startswith(f"hosts.txt:1: malformed token '{token}'")
    assert "key=value" in msg


def test_spaces_around_equals_are_malformed():
    assert parse_error("node1 slots = 4").startswith("hosts.txt:1: malformed token 'slots'")


@pytest.mark.parametrize("line", ["slots=4", ":22 slots=1", "[]:22 slots=1"])
def test_empty_host(line):
    msg = parse_error(f"node0\n{line}")
    assert msg.startswith("hosts.txt:2: empty host")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n   # another\n"])
def test_empty_file(text):
    msg = parse_error(text)
    assert msg.startswith("hosts.txt: no hosts")
    assert "add a line like" in msg


def test_bad_ipv6_without_brackets():
    msg = parse_error("node1:22:33 slots=1")
    assert msg.startswith("hosts.txt:1: ") and "[addr]:port" in msg


# --- read_hostfile -----------------------------------------------------------------------------

def test_read_hostfile(tmp_path):
    path = tmp_path / "hosts.txt"
    path.write_text(EXAMPLE)
    assert read_hostfile(path) == parse_hostfile(EXAMPLE)


def test_read_hostfile_errors_name_real_path(tmp_path):
    path = tmp_path / "hosts.txt"
    path.write_text("node1 slot=1\n")
    with pytest.raises(ConfigError, match=f"^{path}:1: unknown key 'slot'"):
        read_hostfile(str(path))


def test_read_missing_hostfile(tmp_path):
    path = tmp_path / "missing.txt"
    with pytest.raises(ConfigError) as info:
        read_hostfile(path)
    assert str(path) in str(info.value) and "No such file" in str(info.value)


def test_read_directory_as_hostfile(tmp_path):
    with pytest.raises(ConfigError, match="cannot read hostfile"):
        read_hostfile(tmp_path)


def test_read_non_utf8_hostfile(tmp_path):
    path = tmp_path / "hosts.bin"
    path.write_bytes(b"node1 \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_hostfile(path)


# --- split_host_port / join_host_port ----------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("node1", ("node1", None)),
    ("node1:22", ("node1", 22)),
    ("1.2.3.4:22", ("1.2.3.4", 22)),
    ("1.2.3.4", ("1.2.3.4", None)),
    ("[::1]:22", ("::1", 22)),
    ("[::1]", ("::1", None)),
    ("::1", ("::1", None)),
    ("fe80::1%eth0", ("fe80::1%eth0", None)),
    ("node1:65535", ("node1", 65535)),
])
def test_split_host_port(text, expected):
    assert split_host_port(text) == expected


@pytest.mark.parametrize("text", ["node1:x", "node1:0", "node1:70000", "[::1]:", "[::1]x", "[::1",
                                  "", ":22", "a:b:c", "node1:-1"])
def test_split_host_port_errors(text):
    with pytest.raises(ConfigError):
        split_host_port(text)


@pytest.mark.parametrize("host,port", [("node1", None), ("node1", 22), ("::1", 22), ("1.2.3.4", 80)])
def test_join_round_trips(host, port):
    assert split_host_port(join_host_port(host, port)) == (host, port)


# --- is_local_host -----------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["localhost", "LOCALHOST", "127.0.0.1", "127.1.2.3", "::1", "[::1]",
                                  "::ffff:127.0.0.1"])
def test_loopback_is_local(host):
    assert is_local_host(host)


def test_own_hostname_is_local():
    assert is_local_host(socket.gethostname())
    assert is_local_host(socket.getfqdn())


@pytest.mark.parametrize("host", ["no-such-host.invalid", "203.0.113.77",
                                  "2001:db8::dead", "", "not a host"])
def test_foreign_hosts_are_not_local(host):
    assert not is_local_host(host)


def test_interface_addresses_are_local():
    for addr in hosts_mod._local_addresses():
        assert is_local_host(addr)


def test_proc_parsers(tmp_path):
    fib = tmp_path / "fib_trie"
    fib.write_text("Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 10.1.2.3\n        /32 host LOCAL\n"
                   "     |-- 10.1.2.255\n        /32 link BROADCAST\n"
                   "     |-- 127.0.0.0\n        /8 host LOCAL\n")
    assert hosts_mod._proc_ipv4_addresses(str(fib)) == {"10.1.2.3"}
    inet6 = tmp_path / "if_inet6"
    inet6.write_text("fd000000000000000000000000000002 04 40 00 82     eth0\n"
                     "00000000000000000000000000000001 01 80 10 80       lo\n")
    assert hosts_mod._proc_ipv6_addresses(str(inet6)) == {"fd00::2", "::1"}
    assert hosts_mod._proc_ipv4_addresses(str(tmp_path / "missing")) == set()
