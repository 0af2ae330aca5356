"""free_port: ports that outgoing connections cannot take before a child process binds them."""

import socket
import subprocess
import sys

from gateway.processes import ephemeral_port_range, free_port


def test_free_ports_lie_outside_the_ephemeral_range_and_are_never_handed_out_twice():
    low, high = ephemeral_port_range()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert not [port for port in ports if low <= port <= high]
    with socket.socket() as sock:  # still free to bind
        sock.bind(("127.0.0.1", ports[0]))


def test_a_block_of_ports_is_free_as_a_whole_and_not_handed_out_again():
    low, high = ephemeral_port_range()
    base = free_port(room=3)
    block = set(range(base, base + 3))
    assert not [port for port in block if low <= port <= high]
    assert not block.intersection(free_port() for _ in range(200))
    with socket.socket() as a, socket.socket() as b, socket.socket() as c:
        for sock, port in zip((a, b, c), sorted(block)):
            sock.bind(("127.0.0.1", port))


def test_a_port_another_process_holds_is_skipped(monkeypatch):
    from gateway import processes

    held_port, next_port = free_port(), free_port()
    draws = iter([held_port, next_port])

    class Draws:
        def choice(self, candidates):
            return next(draws)

    monkeypatch.setattr(processes, "_handed_out", set())  # as if another process had bound held_port
    monkeypatch.setattr(processes, "_RANDOM", Draws())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", held_port))
        assert free_port() == next_port


def test_a_port_another_live_process_drew_is_skipped_though_still_bindable(monkeypatch):
    """Parallel test workers (and launchers) draw ports before their children bind them: while
    the process that drew a port lives, no other process is handed it; once it exits, it is free."""
    from gateway import processes

    drawer = subprocess.Popen(
        [sys.executable, "-c", "import sys; from gateway.processes import free_port; "
                               "print(free_port(room=2), flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        theirs = int(drawer.stdout.readline())
        mine = free_port()
        draws = iter([theirs, theirs + 1, mine, theirs])

        class Draws:
            def choice(self, candidates):
                return next(draws)

        monkeypatch.setattr(processes, "_handed_out", set())
        monkeypatch.setattr(processes, "_RANDOM", Draws())
        with socket.socket() as sock:  # nothing is bound there: only the other process's claim stands in the way
            sock.bind(("127.0.0.1", theirs))
        assert free_port() == mine
    finally:
        drawer.stdin.close()
        drawer.wait(30)
    assert free_port() == theirs  # the claim died with its process
