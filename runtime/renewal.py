"""A claim kept alive while its holder works: a thread that calls a function every few
seconds until stopped. A lease (runtime/lease.py) and a pin (indexing/versions.py) renew
their objects with it, every quarter of their time to live."""

import threading


class Renewal:
    """Call `renew()` every `every` seconds in a daemon thread, from `start()` (or entering a
    `with` block) until `stop()` (or leaving it), or until `renew` returns False: the claim is
    lost, there is nothing left to renew. An OSError (a store hiccup) skips one call; the next
    tries again, well before the claim expires."""

    def __init__(self, renew, every, name):
        self.renew, self.every = renew, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _loop(self):
        while not self._stop.wait(self.every):
            try:
                if self.renew() is False:
                    return
            except OSError:
                continue
