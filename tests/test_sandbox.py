"""The HumanEval sandbox (benchmarks/quality/sandbox.py): generated code runs in a limited child process."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "quality"))

import sandbox  # noqa: E402


def test_a_passing_and_a_failing_program():
    assert sandbox.run("assert 1 + 1 == 2\n").passed
    out = sandbox.run("def f():\n    return 3\nassert f() == 4, 'wrong answer'\n")
    assert not out.passed and "AssertionError: wrong answer" in out.reason


def test_a_program_that_never_ends_is_killed_at_the_timeout():
    t0 = time.time()
    out = sandbox.run("while True:\n    pass\n", timeout=2)
    assert not out.passed and out.reason == "timeout"
    assert time.time() - t0 < 10


def test_memory_is_bounded():
    out = sandbox.run(f"x = bytearray({2 * sandbox.MEMORY_BYTES})\n")
    assert not out.passed and "MemoryError" in out.reason


def test_the_child_runs_isolated_in_a_scratch_directory():
    """Not the caller's environment or working directory."""
    program = (
        "import os\n"
        "assert 'KVMIX_SANDBOX_SECRET' not in os.environ\n"
        "assert os.path.basename(os.getcwd()).startswith('kvmix-sandbox-')\n"
    )
    import os

    os.environ["KVMIX_SANDBOX_SECRET"] = "1"
    try:
        out = sandbox.run(program)
    finally:
        del os.environ["KVMIX_SANDBOX_SECRET"]
    assert out.passed, out.reason
