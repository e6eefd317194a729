"""Ctrl-C stops a command with a line saying whether its work is kept, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from d2llm import cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("command", "said"),
    [
        ("train", "d2llm train stopped: run it again to go on from its checkpoint"),
        ("teacher-finetune", "d2llm teacher-finetune stopped: run it again to go on from its checkpoint"),
        ("evaluate", "d2llm evaluate stopped\n"),
    ],
)
def test_ctrl_c_exits_130_and_says_what_is_kept(command, said, tmp_path, monkeypatch, capsys):
    def interrupted(args, params):
        raise KeyboardInterrupt

    _, add_arguments, help_text = cli._COMMANDS[command]
    monkeypatch.setitem(cli._COMMANDS, command, (interrupted, add_arguments, help_text))
    monkeypatch.chdir(tmp_path)  # the pipeline lock's file goes here
    assert cli.main(["--params", str(ROOT / "params.yaml"), command]) == 130
    err = capsys.readouterr().err
    assert f"interrupted: {said}" in err and "Traceback" not in err
