"""Which device a server's shards live on: a pure function of the request, rank, addresses and GPUs."""

from __future__ import annotations

import pytest

from psframework.devices import pick_server_device
from psframework.errors import ConfigError

ONE_HOST = ["tcp://127.0.0.1:5001", "tcp://127.0.0.1:5002", "tcp://127.0.0.1:5003"]


@pytest.mark.parametrize("rank,gpus,want", [(0, 2, "cuda:0"), (1, 2, "cuda:1"), (2, 2, "cuda:0"),
                                            (2, 4, "cuda:2"), (1, 1, "cuda:0")])
def test_servers_of_one_host_take_its_gpus_in_turn(rank, gpus, want):
    assert pick_server_device("cuda", rank, ONE_HOST, gpus) == want


def test_the_turn_counts_only_servers_of_the_same_host():
    addresses = ["tcp://10.0.0.1:1", "tcp://10.0.0.2:1", "tcp://10.0.0.1:2", "tcp://10.0.0.2:2"]
    assert [pick_server_device("cuda", r, addresses, 2) for r in range(4)] == ["cuda:0", "cuda:0",
                                                                                "cuda:1", "cuda:1"]


def test_default_is_a_gpu_where_there_is_one():
    assert pick_server_device(None, 1, ONE_HOST, 2) == "cuda:1"
    assert pick_server_device(None, 1, ONE_HOST, 0) == "cpu"


def test_explicit_choices_win():
    assert pick_server_device("cpu", 1, ONE_HOST, 2) == "cpu"
    assert pick_server_device("cuda:1", 0, ONE_HOST, 2) == "cuda:1"


def test_impossible_requests_say_why():
    with pytest.raises(ConfigError, match="no GPU"):
        pick_server_device("cuda", 0, ONE_HOST, 0)
    with pytest.raises(ConfigError, match="2 GPU"):
        pick_server_device("cuda:2", 0, ONE_HOST, 2)
    with pytest.raises(ConfigError, match="cuda:N"):
        pick_server_device("gpu", 0, ONE_HOST, 2)
