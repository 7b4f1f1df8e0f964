"""Model and data named on the command line by tests/distributed/test_cli.py."""

from __future__ import annotations

from tests.distributed.workers import classification_problem


def build():
    return classification_problem()[0]


def data():
    _, x, y = classification_problem()
    return (x, y)
