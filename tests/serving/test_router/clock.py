"""A clock the test moves by hand (for the router's conversation TTL)."""

import time


class FakeClock:
    def __init__(self):
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
