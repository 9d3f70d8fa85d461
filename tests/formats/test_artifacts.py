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
