"""Runs last (files are collected in name order): nothing the lab started lives on.

``conftest.pytest_sessionfinish`` checks again after every fixture is torn
down and fails the session if anything survived; this test makes the check a
visible line of the report.
"""

from lab import survivors


def test_no_lab_process_survives_the_earlier_tests():
    left = survivors()
    assert not left, "processes left behind:\n" + "\n".join(f"{p}: {c}" for p, c in left)
