"""`meshlet run --addon`: which engine it picks, and the flag mistakes refused before anything starts."""

from __future__ import annotations

import pytest

from meshlet.cli import build_parser, main
from meshlet.commands.run import _addons, _engine
from meshlet.proxy.engine import DEFAULT_ENGINE


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "addon.py"
    path.write_text("def response(flow):\n    pass\n")
    return path


def test_addon_selects_the_mitmproxy_engine(script):
    assert _engine(build_parser().parse_args(["run", "--addon", str(script)])) == "mitmproxy"
    assert _engine(build_parser().parse_args(["run", "--engine", "mitmproxy", "--addon", str(script)])) == "mitmproxy"
    assert _engine(build_parser().parse_args(["run"])) == DEFAULT_ENGINE


def test_addons_reach_the_workers_as_absolute_paths_once(script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "other.py"
    other.write_text("")
    assert _addons(["addon.py", str(other)]) == (str(script), str(other))


@pytest.mark.parametrize(("extra", "message"), [
    (["--engine", "lean"], "--addon runs mitmproxy addon scripts: it needs --engine mitmproxy, not lean"),
    (["--addon", "{script}"], "--addon {script}: given twice"),
    (["--addon", "missing.py"], "--addon missing.py: no such file"),
])
def test_flag_mistakes_are_one_line_and_exit_1(script, tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--policy", "absent.yaml", "--addon", str(script), *[e.format(script=script) for e in extra]]
    assert main(argv) == 1
    assert capsys.readouterr().err == f"meshlet: {message.format(script=script)}\n"
