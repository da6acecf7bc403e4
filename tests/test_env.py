import re

import pytest
from dwdp_ops.env import DEFAULT_MASTER_PORT, DistEnv


def test_single_process_default():
    e = DistEnv.from_environ({})
    assert (e.rank, e.world_size, e.local_rank, e.launcher) == (0, 1, 0, "single")
    assert e.master_addr == "127.0.0.1" and e.master_port == DEFAULT_MASTER_PORT


def test_torchrun_variables():
    e = DistEnv.from_environ(
        {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1",
         "MASTER_PORT": "1234"}
    )
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size) == (3, 4, 1, 2)
    assert (e.master_addr, e.master_port, e.launcher) == ("10.0.0.1", 1234, "torchrun")


def test_openmpi_variables():
    e = DistEnv.from_environ(
        {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
         "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    )
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size, e.launcher) == (2, 4, 2, 4, "mpirun")


def test_local_rank_defaults_to_rank():
    e = DistEnv.from_environ({"RANK": "1", "WORLD_SIZE": "2"})
    assert (e.local_rank, e.local_world_size) == (1, 2)


def test_agreeing_launchers_are_accepted():
    e = DistEnv.from_environ({"RANK": "1", "WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"})
    assert e.rank == 1


@pytest.mark.parametrize(
    "env, match",
    [
        ({"RANK": "x", "WORLD_SIZE": "2"}, r"RANK='x' is not an integer"),
        ({"RANK": "0"}, r"RANK is set but WORLD_SIZE is not"),
        ({"WORLD_SIZE": "2"}, r"WORLD_SIZE is set but RANK is not"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, r"rank 2 is outside \[0, 2\)"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, r"world size must be >= 1"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "70000"}, r"MASTER_PORT=70000"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"}, r"local rank 3"),
        (
            {"RANK": "0", "WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"},
            r"launcher environments disagree",
        ),
    ],
)
def test_bad_environment_is_named(env, match):
    with pytest.raises(ValueError, match=match):
        DistEnv.from_environ(env)


# -- DWDP_TIMEOUT: one parser (env.timeout_from_environ) for init() and dispatch_nccl --------------------------------
def test_timeout_default_variable_and_argument():
    from dwdp_ops.env import DEFAULT_TIMEOUT, timeout_from_environ

    assert timeout_from_environ(environ={}) == DEFAULT_TIMEOUT == 300.0
    assert timeout_from_environ(environ={"DWDP_TIMEOUT": "  "}, default=7) == 7.0  # blank counts as unset
    assert timeout_from_environ(environ={"DWDP_TIMEOUT": " 12.5 "}) == 12.5
    assert timeout_from_environ(3, environ={"DWDP_TIMEOUT": "abc"}) == 3.0  # the argument wins, the variable is unread


@pytest.mark.parametrize("raw", ["abc", "-1", "0", "nan", "inf", "1e999", "5s"])
def test_bad_timeout_variable_is_named(raw):
    from dwdp_ops.env import timeout_from_environ

    with pytest.raises(ValueError, match=rf"DWDP_TIMEOUT='{raw}': expected a finite number of seconds > 0 "
                                         r"\(unset it for the default 300\)"):
        timeout_from_environ(environ={"DWDP_TIMEOUT": raw})


@pytest.mark.parametrize("bad, why", [(0, " and finite"), (-1.5, " and finite"), (float("nan"), " and finite"),
                                      (float("inf"), " and finite"), ("abc", "")])
def test_bad_timeout_argument_is_named_as_the_argument(bad, why):
    """Named as the argument (not the variable), with the value given: every message of the argument check starts
    'timeout must be > 0 seconds', so the match is the whole message."""
    from dwdp_ops.env import timeout_from_environ

    with pytest.raises(ValueError, match=rf"^timeout must be > 0 seconds{why}, got {re.escape(repr(bad))}$"):
        timeout_from_environ(bad, environ={})


def test_nccl_baseline_names_a_bad_timeout_variable_before_starting(monkeypatch):
    """``dispatch_nccl.init_process_group_from_env`` reads DWDP_TIMEOUT through the same parser, before any group
    starts (gloo, one rank: nothing would start anyway, but the message must name the variable)."""
    pytest.importorskip("torch", reason="dispatch_nccl needs torch")
    dist = pytest.importorskip("torch.distributed")
    from dwdp_ops.dispatch_nccl import init_process_group_from_env

    if dist.is_initialized():
        pytest.skip("torch.distributed is already initialised in this process")
    for k, v in dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29531").items():
        monkeypatch.setenv(k, v)
    for raw in ("abc", "-1"):
        monkeypatch.setenv("DWDP_TIMEOUT", raw)
        with pytest.raises(ValueError, match=rf"DWDP_TIMEOUT='{raw}': expected a finite number of seconds > 0"):
            init_process_group_from_env("gloo")
        assert not dist.is_initialized()


def test_a_bool_timeout_argument_is_refused():
    """``init(timeout=True)`` used to mean 1 second (float(True))."""
    import numpy as np
    from dwdp_ops.env import timeout_from_environ

    for bad in (True, False, np.bool_(True)):
        with pytest.raises(ValueError, match=rf"^timeout must be > 0 seconds \(a number, not a bool\), got {bad!r}$"):
            timeout_from_environ(bad, environ={})
    assert timeout_from_environ(np.float32(2.5), environ={}) == 2.5


@pytest.mark.parametrize("kw, match", [
    ({"rank": 0.5, "world_size": 2}, r"rank must be an int, got 0.5"),
    ({"world_size": 2.0}, r"world_size must be an int, got 2.0"),
    ({"rank": True, "world_size": 2}, r"rank must be an int, got True"),
    ({"rank": "0"}, r"rank must be an int, got '0'"),
    ({"master_port": "29500"}, r"master_port must be an int, got '29500'"),
])
def test_dist_env_fields_must_be_integers(kw, match):
    """DistEnv(rank=0.5, world_size=2) and DistEnv(rank=True, ...) were accepted; a string raised a comparison
    TypeError that named no field."""
    with pytest.raises(TypeError, match=match):
        DistEnv(**kw)


def test_dist_env_numpy_integers_become_ints():
    import numpy as np

    e = DistEnv(np.int64(1), np.int64(2))
    assert (e.rank, e.world_size) == (1, 2) and type(e.rank) is int and type(e.world_size) is int


@pytest.mark.parametrize("names", [("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
                                   ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                                    "OMPI_COMM_WORLD_LOCAL_SIZE")])
def test_a_node_size_without_a_local_rank_is_named(names):
    """LOCAL_WORLD_SIZE=2 of WORLD_SIZE=4 without LOCAL_RANK: the global rank was taken as the local one, so rank 3
    failed with 'local rank 3 is outside [0, 2)' (a variable nobody set) and rank 1 silently picked GPU 1."""
    rank_n, world_n, local_n, local_world_n = names
    for rank in (1, 3):
        with pytest.raises(ValueError, match=rf"{local_world_n}=2 \(fewer than {world_n}=4: more than one node\) "
                                             rf"is set but {local_n} is not"):
            DistEnv.from_environ({rank_n: str(rank), world_n: "4", local_world_n: "2"})
    e = DistEnv.from_environ({rank_n: "1", world_n: "2", local_world_n: "2"})  # one node: the global rank is local
    assert (e.local_rank, e.local_world_size) == (1, 2)


def test_a_timeout_too_long_for_a_socket_is_refused_where_it_is_parsed():
    """DWDP_TIMEOUT=1e10 (finite, > 0) was accepted, and the rendezvous then failed deep inside with
    'OverflowError: timestamp out of range for platform time_t' from socket.settimeout. The longest wait accepted
    (MAX_TIMEOUT) must fit every wait it is used for: a socket, a lock, a deadline with rendezvous's 5 s of grace."""
    import socket
    import threading

    from dwdp_ops.env import MAX_TIMEOUT, timeout_from_environ

    for raw in ("1e10", "9999999999", "1e300"):
        with pytest.raises(ValueError, match=rf"^environment variable DWDP_TIMEOUT='{raw}': expected at most 1e\+09 "
                                             r"seconds \(about 31 years; unset it for the default 300\)$"):
            timeout_from_environ(environ={"DWDP_TIMEOUT": raw})
        with pytest.raises(ValueError, match=r"^timeout must be at most 1e\+09 seconds \(about 31 years\), got "):
            timeout_from_environ(float(raw), environ={})
    assert timeout_from_environ(environ={"DWDP_TIMEOUT": "1e9"}) == MAX_TIMEOUT
    assert timeout_from_environ(MAX_TIMEOUT, environ={}) == MAX_TIMEOUT
    with socket.socket() as s:
        s.settimeout(MAX_TIMEOUT + 5.0)
    assert threading.Lock().acquire(timeout=MAX_TIMEOUT + 5.0)
