"""Stand-ins for math-verify in MathVerifier's worker processes: module-level (picklable) and
light to import (a spawned worker imports the module that defines them)."""


def never_equal(pred, gold, timeout_s):
    """Every pair that reaches a worker differs."""
    return False
