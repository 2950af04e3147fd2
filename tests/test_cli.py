"""Every subcommand is registered and its --help renders (argparse formats HELP strings
with %, so a stray % in a help text breaks `moechat --help`)."""

from __future__ import annotations

import pytest

from moechat.app.cli import COMMANDS, build_parser, main


def test_every_command_is_built():
    parser = build_parser()
    choices = next(a for a in parser._actions if a.dest == "command").choices
    assert set(choices) == set(COMMANDS)


@pytest.mark.parametrize("argv", [["--help"]] + [[name, "--help"] for name in COMMANDS])
def test_help_renders(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: moechat")
