"""Waiting on a condition that paho's network thread signals, with a deadline."""

import time


def wait_until(cond, pred, timeout):
    """Waits on `cond` (a threading.Condition) until `pred()` holds or `timeout` seconds
    pass; returns whether it held. `pred` is evaluated with `cond` held."""
    deadline = time.monotonic() + timeout
    with cond:
        while not pred():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            cond.wait(left)
        return True
