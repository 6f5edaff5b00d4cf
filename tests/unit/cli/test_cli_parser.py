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
