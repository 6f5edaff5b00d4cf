"""The argument parser shared by every command."""

from __future__ import annotations

import pytest

from meshlet.cli import build_parser


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--metrics", "istio"],  # a prefix of --metrics-compat
        ["run", "--work", "2"],  # a prefix of --workers and --workload
        ["cert", "issue", "--ca", "c", "--spiffe", "spiffe://d/ns/n/sa/s", "--out", "o", "--tt", "1h"],  # nested
    ],
)
def test_abbreviated_options_are_refused_not_guessed(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(argv)
    assert exit.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_full_option_names_still_parse():
    args = build_parser().parse_args(["run", "--metrics-compat", "istio", "--workers", "2"])
    assert (args.metrics_compat, args.workers) == ("istio", 2)


def test_a_failed_optimizing_re_exec_serves_on_with_a_warning(monkeypatch, capsys):
    from meshlet import cli
    from meshlet.proxy import optimize

    def refuse(*_):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(optimize.os, "execv", refuse)
    monkeypatch.setattr(optimize.sys, "flags", type("Flags", (), {"optimize": 0})())
    monkeypatch.delenv(optimize.DEBUG_ENV, raising=False)
    cli._reexec_optimized(build_parser().parse_args(["run", "--policy", "p.yaml", "--workers", "1"]))
    assert "serving without -O" in capsys.readouterr().err
