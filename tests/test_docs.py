"""The README's commands and the configs' comments cannot go stale silently."""

import inspect
import re
import runpy
import shlex
import sys
import textwrap
from pathlib import Path

import pytest

from cli import cli_main
from lightning_module import MNISTAdder

ROOT = Path(__file__).resolve().parents[1]


def shell_commands(markdown: str) -> list[list[str]]:
    """Every command of the ```bash blocks: continuation lines joined, comments dropped, split as the shell would."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;", line.split(" #")[0]):
                if part.strip():
                    commands.append(shlex.split(part))
    return commands


def cli_args(words: list[str]) -> list[str] | None:
    """The arguments after `cli.py`, whoever runs it (python, .venv/bin/python, torchrun, srun)."""
    return words[words.index("cli.py") + 1 :] if "cli.py" in words else None


def scripts(words: list[str]) -> list[str]:
    return [w for w in words if w.endswith((".py", ".sh")) or w.startswith(".ci/")]


README_COMMANDS = shell_commands((ROOT / "README.md").read_text())
CLI_COMMANDS = [args for words in README_COMMANDS if (args := cli_args(words)) is not None]


def test_the_readme_has_commands_of_every_kind():
    assert len(CLI_COMMANDS) >= 10
    assert {args[0] for args in CLI_COMMANDS} == {"fit", "validate", "test", "predict"}


@pytest.mark.parametrize("args", CLI_COMMANDS, ids=[" ".join(a) for a in CLI_COMMANDS])
def test_every_readme_cli_command_parses(args, monkeypatch, capsys):
    """Each `cli.py` line parses with every option it names. `--ckpt_path` names a checkpoint a reader has after
    training, so it is dropped and the rest printed as a config (which validates every option and value)."""
    monkeypatch.chdir(ROOT)  # configs/ and examples/ as the README names them
    if "--help" in args:
        args = [a for a in args if a != "--help"]
    args = [a for k, a in enumerate(args) if a != "--ckpt_path" and (k == 0 or args[k - 1] != "--ckpt_path")]
    with pytest.raises(SystemExit) as end:
        cli_main([*args, "--print_config"])
    assert end.value.code in (0, None), capsys.readouterr().err
    assert "model:" in capsys.readouterr().out


SCRIPTS = sorted({s for words in README_COMMANDS for s in scripts(words) if s != "cli.py"})


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_the_readme_names_exists_and_answers_help(script, monkeypatch, capsys):
    path = ROOT / script
    assert path.is_file(), f"the README names {script}, which does not exist"
    if path.suffix != ".py":
        return
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    with pytest.raises(SystemExit) as end:
        runpy.run_path(str(path), run_name="__main__")
    assert end.value.code in (0, None)
    assert "usage" in capsys.readouterr().out.lower()


def test_a_broken_option_name_fails_the_parse_check(capsys):
    """What the README check relies on: a misspelt option ends the parse with an error, not silently."""
    with pytest.raises(SystemExit) as end:
        cli_main(["fit", "--config", str(ROOT / "configs" / "fast.yaml"), "--model.sum_los", "mse", "--print_config"])
    assert end.value.code not in (0, None)


def test_config_comments_state_no_measured_figure():
    """A config says what a setting does; its measured figures live in docs/experiments.md and BENCHMARKS.md."""
    figure = re.compile(r"\d+\.\d+ ?%|\d+(\.\d+)? ?(s|seconds|minutes)\b|scored|higher on validation")
    for config in sorted((ROOT / "configs").glob("*.yaml")):
        for number, line in enumerate(config.read_text().splitlines(), 1):
            comment = line.partition("#")[2]
            assert not figure.search(comment), f"{config.name}:{number} states a figure: {comment.strip()}"


def test_the_readme_prints_the_training_step_as_it_is():
    """The README's lesson is the step itself: a change to `training_step` that the README does not follow fails."""
    printed = re.search(r"```python\n(\s*def training_step.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert printed, "the README prints no training_step"
    assert textwrap.dedent(printed.group(1)) == textwrap.dedent(inspect.getsource(MNISTAdder.training_step))
