"""The README's command reference is what the commands' `--help` says, complete, with no
Python type placeholders, and the same on every machine (in-process: no subprocess)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

import gembatch
from gembatch.cli import app
from gembatch.cli import reference as ref
from gembatch.cli.app import COMMAND_ORDER

README = Path(__file__).resolve().parents[2] / "README.md"
# `<bool>`, `<path>`, `<list[str]>`, `<int range>`: Typer's type placeholders.
PLACEHOLDER = re.compile(r"<[a-z][a-z0-9_ ,|\[\]]*>")


def all_commands() -> Iterator[tuple[list[str], Any]]:
    """(path, command) for every command and subcommand as registered, hidden ones
    excepted: walked through `.commands`, not the generator's own listing."""

    def walk(path: list[str], command: Any) -> Iterator[tuple[list[str], Any]]:
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():
            if not sub.hidden:
                yield from walk([*path, name], sub)

    yield from walk([], typer.main.get_command(app))


def sections(reference: str) -> dict[str, str]:
    """`gembatch db backup` -> the text of its section of the reference."""
    parts = re.split(r"^### `([^`]+)`$", reference, flags=re.MULTILINE)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def test_readme_command_reference_is_what_the_commands_render_now() -> None:
    text = README.read_text(encoding="utf-8")
    assert ref.readme_reference(text) == ref.render_reference(), (
        "README.md's command reference differs from the commands' --help: run `make docs`"
    )


def test_every_command_and_every_option_is_in_the_reference() -> None:
    found = sections(ref.render_reference())
    for path, command in all_commands():
        title = " ".join(["gembatch", *path])
        assert title in found, f"`{title}` has no section in the reference"
        section = found[title]
        for param in command.params:
            if param.hidden:
                continue
            if param.param_type_name == "argument":
                row = rf"^\| `\[?{re.escape(param.metavar)}\]?(\.\.\.)?` \| \S"
                assert re.search(row, section.replace("\\|", "|"), re.M), (title, param.name)
                continue
            rows = dict(re.findall(r"^\| `([^`]+)` \| (.+) \|$", section, flags=re.M))
            for opt in [*param.opts, *param.secondary_opts]:
                named = [name for name in rows if opt in re.split(r"[ ,/]+", name)]
                assert named, f"{title}: {opt} is not in the reference"
                name, text = named[0], rows[named[0]]
                if not param.is_flag:
                    assert name.endswith(f" {param.metavar}"), (title, opt, name)
                plain = text.replace("\\*", "*").replace("\\|", "|").replace("&lt;", "<")
                assert (param.help or "").rstrip(".") in plain, (title, opt, text)
                default = ref._default(param)
                if default:
                    assert f"Default: {default}." in text, (title, opt, text)


def test_every_value_is_named_by_a_metavar_and_no_help_shows_a_type() -> None:
    runner = CliRunner()
    for path, command in all_commands():
        for param in command.params:
            if param.param_type_name == "argument" or not param.is_flag:
                assert param.metavar, (
                    f"gembatch {' '.join(path)}: {param.opts or param.name} takes a value: "
                    "give it a metavar (PATH, N, SECONDS, ...)"
                )
        done = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert done.exit_code == 0, done.output
        assert "Usage" in done.output
        assert not PLACEHOLDER.findall(done.output), (path, PLACEHOLDER.findall(done.output))
    assert not PLACEHOLDER.findall(ref.render_reference())


def test_help_lists_commands_in_the_order_a_user_meets_them() -> None:
    done = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    listed = re.findall(r"^│ (\w+) ", done.output.split("Commands")[1], flags=re.MULTILINE)
    assert listed == list(COMMAND_ORDER)
    top = [title for title in sections(ref.render_reference()) if len(title.split()) == 2]
    assert top == [f"gembatch {c}" for c in listed]


def test_the_reference_is_the_same_on_any_machine_and_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = ref.render_reference()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "37")
    monkeypatch.setenv("GEMBATCH_MODEL", "gemini-other")
    assert ref.render_reference() == first
    install = str(Path(gembatch.__file__).resolve().parent.parent)
    for local in (install, str(Path.home()), str(tmp_path)):
        assert local not in first
    assert "╭" not in first and "│" not in first  # no Rich boxes


def test_an_out_of_date_readme_is_reported_then_rewritten(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    current = README.read_text(encoding="utf-8")
    stale = current.replace("| `--once` | ", "| `--once` | Poll once (an old text). ")
    assert stale != current
    readme.write_text(stale, encoding="utf-8")

    assert ref.main(["--check", str(readme)]) == 1
    assert readme.read_text(encoding="utf-8") == stale  # --check never writes
    assert ref.main([str(readme)]) == 0
    assert readme.read_text(encoding="utf-8") == current  # only the section changed
    assert ref.main(["--check", str(readme)]) == 0


def test_a_readme_without_markers_is_refused_with_what_to_add(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# a project\n", encoding="utf-8")
    with pytest.raises(SystemExit) as refused:
        ref.main([str(readme)])
    assert ref.BEGIN in str(refused.value.code) and ref.END in str(refused.value.code)
    assert readme.read_text(encoding="utf-8") == "# a project\n"


OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z-]*|-[a-z])\b")


def command_lines(text: str) -> Iterator[str]:
    """Every command line the README shows: lines of its code blocks (comments cut,
    continuations joined) and its inline `code`, whitespace made single."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            yield " ".join(line.split(" #")[0].split())
    for span in re.findall(r"`([^`]+)`", re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)):
        yield " ".join(span.split())


def test_every_option_the_readme_names_exists_where_it_is_used() -> None:
    """The README outside the generated reference is written by hand: in each command line
    it shows (`gembatch --local poll`, `submit --force`) every option belongs to the
    command it follows (global ones before the command), and in the "Using it" table
    every option a row names belongs to that row's command."""
    text = README.read_text(encoding="utf-8")
    text = text.replace(ref.readme_reference(text), "")
    commands = {" ".join(path): command for path, command in all_commands()}
    root = commands[""]

    def options(command: Any) -> dict[str, Any]:
        found = {o: p for p in command.params for o in [*p.opts, *p.secondary_opts]}
        for sub in getattr(command, "commands", {}).values():
            found |= options(sub)
        return found

    global_options = {o: p for p in root.params for o in [*p.opts, *p.secondary_opts]}
    checked = 0
    for line in command_lines(text):
        tokens = line.split()
        if tokens[:1] == ["gembatch"]:
            tokens = tokens[1:]
        elif not (tokens[:1] and tokens[0] in root.commands and OPTION.search(line)):
            continue
        while tokens and tokens[0].startswith("-"):
            option = global_options.get(tokens.pop(0))
            assert option is not None, f"README: `{line}`: not a global option"
            if not option.is_flag and tokens:
                tokens.pop(0)
        if not tokens or tokens[0] not in root.commands:
            continue
        command = commands[tokens[0]]
        if len(tokens) > 1 and f"{tokens[0]} {tokens[1]}" in commands:
            command = commands[f"{tokens[0]} {tokens[1]}"]
        wrong = set(OPTION.findall(" ".join(tokens[1:]))) - set(options(command))
        assert not wrong, f"README: `{line}`: {sorted(wrong)} not options of {tokens[0]}"
        checked += 1
    assert checked > 20

    overview = text.split("## Using it", 1)[1].split("### What gembatch guarantees", 1)[0]
    rows = [line for line in overview.splitlines() if line.startswith("| `gembatch ")]
    assert len(rows) >= len(COMMAND_ORDER)
    for row in rows:
        name = re.match(r"\| `gembatch (\w+)", row).group(1)
        assert name in commands, f"README names `gembatch {name}`, which does not exist"
        wrong = set(OPTION.findall(row)) - set(options(commands[name])) - set(global_options)
        assert not wrong, f"README's overview of `gembatch {name}` names {sorted(wrong)}"
