"""The I/O threads' poller (``transport/poller.py``) on real sockets: masks as ``selectors`` gives them."""

from __future__ import annotations

import socket

from sipwire.transport.poller import READ, WRITE, Poller


def test_readiness_masks_follow_what_was_registered() -> None:
    poller = Poller()
    ours, theirs = socket.socketpair()
    try:
        poller.register(ours, READ, "conn")
        assert poller.select(0) == []  # nothing to read yet
        theirs.send(b"x")
        assert poller.select(0) == [("conn", READ)]
        poller.modify(ours, READ | WRITE, "conn, now writing")
        assert poller.select(0) == [("conn, now writing", READ | WRITE)]
        poller.modify(ours, WRITE, "conn")
        assert poller.select(0) == [("conn", WRITE)]
        poller.unregister(ours)
        assert poller.select(0) == []
    finally:
        ours.close()
        theirs.close()
        poller.close()


def test_a_hang_up_reads_as_readable_only_where_reading_was_asked() -> None:
    poller = Poller()
    reading, reading_peer = socket.socketpair()
    writing, writing_peer = socket.socketpair()
    try:
        poller.register(reading, READ, "reading")
        poller.register(writing.fileno(), WRITE, "writing")  # a descriptor works as well as a socket
        reading_peer.close()
        writing_peer.close()
        assert sorted(poller.select(0)) == [("reading", READ), ("writing", WRITE)]
    finally:
        reading.close()
        writing.close()
        poller.close()


def test_a_forgotten_socket_closed_at_once_leaves_the_set_and_its_number_can_come_back() -> None:
    poller = Poller()
    ours, theirs = socket.socketpair()
    theirs.send(b"ready")
    poller.register(ours, READ, "old")
    number = ours.fileno()
    poller.forget(ours)
    ours.close()  # the close takes it out of the epoll set
    assert poller.select(0) == []
    reused, reused_peer = socket.socketpair()
    try:
        assert number in (reused.fileno(), reused_peer.fileno())  # the kernel hands the lowest free number out
        fresh = reused if reused.fileno() == number else reused_peer
        other = reused_peer if fresh is reused else reused
        poller.register(fresh, READ, "new")  # no "already registered": the old entry is gone everywhere
        other.send(b"x")
        assert poller.select(0) == [("new", READ)]
    finally:
        reused.close()
        reused_peer.close()
        theirs.close()
        poller.close()


def test_a_forgotten_socket_left_open_is_dropped_rather_than_reported_for_ever() -> None:
    poller = Poller()
    ours, theirs = socket.socketpair()
    try:
        theirs.send(b"ready")
        poller.register(ours, READ, "conn")
        poller.forget(ours)  # its close should have followed, and did not
        assert poller.select(0) == []
        poller.register(ours, READ, "conn again")  # it had left the epoll set: registering again works
        assert poller.select(0) == [("conn again", READ)]
    finally:
        ours.close()
        theirs.close()
        poller.close()


def test_select_waits_up_to_its_timeout() -> None:
    poller = Poller()
    try:
        assert poller.select(0.01) == []
    finally:
        poller.close()
