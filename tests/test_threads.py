"""The CPU thread policy (editeval.core.threads) and ``editeval --threads``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from editeval.core import threads as policy


def test_default_leaves_room_for_one_busy_process(monkeypatch):
    # a default of one thread per core (torch's own) fails here: it is what made a contended
    # edit 20-60x slower (benchmarks/contention.py)
    for cores, expected in ((1, 1), (2, 1), (3, 1), (8, 4), (64, 32)):
        monkeypatch.setattr(policy, "available_cores", lambda cores=cores: cores)
        assert policy.default_threads() == expected


def test_precedence_flag_over_environment_over_default(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(policy, "available_cores", lambda: 8)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert policy.configure_threads(None) == 3 and torch.get_num_threads() == 3
        assert policy.configure_threads(2) == 2 and torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert policy.configure_threads(None) == 4 and torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_bad_environment_value_is_named(monkeypatch, value):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    with pytest.raises(ValueError, match=f"OMP_NUM_THREADS must be a positive integer.*{value}"):
        policy.configure_threads(None)


def _threads_in_cli(*args: str, env_threads: str | None) -> subprocess.CompletedProcess:
    """Run the CLI's callback in a fresh process and print torch's thread count after it."""
    code = ("import sys; from typer.testing import CliRunner; from editeval.cli import app; "
            "r = CliRunner().invoke(app, sys.argv[1:]); import torch; "
            "print(r.exit_code, torch.get_num_threads(), r.output.strip().splitlines()[-1:] )")
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_NUM_THREADS"}
    if env_threads is not None:
        env["OMP_NUM_THREADS"] = env_threads
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_threads_flag_reaches_torch():
    # torch is imported after the callback here, so the flag must travel through the
    # environment: a policy that only called torch.set_num_threads on an imported torch fails
    done = _threads_in_cli("--threads", "3", "methods", env_threads="1")
    assert done.stdout.split()[:2] == ["0", "3"], done.stdout + done.stderr


def test_cli_bad_environment_is_one_line():
    done = _threads_in_cli("methods", env_threads="many")
    code, _, last = done.stdout.partition(" ")
    assert code == "2" and "OMP_NUM_THREADS must be a positive integer" in done.stdout, done.stdout
