"""Suite-wide checks."""

import sys


def pytest_sessionfinish(session, exitstatus):
    # The CPU suite must never need sglang (engines/sglang.py imports it lazily; the
    # SGLang tests use tests/fake_sglang.py).
    if "sglang" in sys.modules and sys.modules["sglang"] is not None:
        print("\nFAILED: the CPU test suite imported sglang", file=sys.stderr)
        session.exitstatus = 1
