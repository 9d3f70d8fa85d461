"""formats.artifacts: signal deferral around multi-step renames."""


def test_signals_deferred_holds_a_signal_any_thread_receives_until_the_block_ends():
    """A process-wide SIGTERM goes to any thread not blocking it (here a sleeping helper, as
    torch's threads are in a stage); its handler must still wait for the block to finish."""
    import os
    import signal
    import threading
    import time

    from flamingo_cli.formats.artifacts import signals_deferred

    events = []

    def handler(signum, frame):
        events.append("handler")

    previous = signal.signal(signal.SIGTERM, handler)
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait)
    helper.start()
    try:
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # bytecodes at which a delivered handler would run
                time.sleep(0.0001)
            events.append("block done")
        time.sleep(0.01)
        assert events == ["block done", "handler"]
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        stop.set()
        helper.join()
        signal.signal(signal.SIGTERM, previous)


def test_a_large_files_digest_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    import hashlib
    import os

    from flamingo_cli.formats import artifacts

    monkeypatch.setenv("FLAMINGO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(artifacts, "DIGEST_MEMO_BYTES", 1024)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 4096)
    first = artifacts.digest_file(weights)
    assert first == hashlib.sha256(b"a" * 4096).hexdigest()
    (memo,) = (tmp_path / "cache" / "digests").iterdir()
    memo.write_text("f" * 64 + "\n")  # what a remembered digest is used as, unread file or not
    assert artifacts.digest_file(weights) == "f" * 64

    stat = weights.stat()
    weights.write_bytes(b"b" * 4096)  # the same size, rewritten in place
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert artifacts.digest_file(weights) == hashlib.sha256(b"b" * 4096).hexdigest()

    replaced = tmp_path / "new"
    replaced.write_bytes(b"c" * 4096)
    os.replace(replaced, weights)  # an atomic save: a new inode
    assert artifacts.digest_file(weights) == hashlib.sha256(b"c" * 4096).hexdigest()

    for memo in (tmp_path / "cache" / "digests").iterdir():
        memo.write_text("not a digest")
    assert artifacts.digest_file(weights) == hashlib.sha256(b"c" * 4096).hexdigest(), "a damaged memo is ignored"

    small = tmp_path / "small"
    small.write_bytes(b"x")
    before = set((tmp_path / "cache" / "digests").iterdir())
    assert artifacts.digest_file(small) == hashlib.sha256(b"x").hexdigest()
    assert set((tmp_path / "cache" / "digests").iterdir()) == before, "small files are hashed, not remembered"


def test_a_cache_that_cannot_be_written_only_means_hashing_again(tmp_path, monkeypatch):
    import hashlib

    from flamingo_cli.formats import artifacts

    (tmp_path / "cache").write_text("a file where the cache directory would be")
    monkeypatch.setenv("FLAMINGO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(artifacts, "DIGEST_MEMO_BYTES", 1)
    weights = tmp_path / "w"
    weights.write_bytes(b"abc")
    assert artifacts.digest_file(weights) == artifacts.digest_file(weights) == hashlib.sha256(b"abc").hexdigest()
