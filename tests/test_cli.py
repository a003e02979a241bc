import subprocess
import sys

from distributed_muon.launch.cli import main

from distributed_muon import __version__


def test_help_and_version(capsys):
    assert main([]) == 0
    assert "demo" in capsys.readouterr().out
    assert main(["version"]) == 0
    assert __version__ in capsys.readouterr().out


def test_version_flag():
    out = subprocess.run([sys.executable, "-m", "distributed_muon.launch.cli", "--version"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith(f"distributed_muon {__version__}")


def test_every_help_shows_every_default(monkeypatch):
    import argparse

    from distributed_muon.launch.cli import build_parser

    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        lines = sub.format_help().splitlines()
        for action in sub._actions:
            if not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
                continue
            i = next(i for i, x in enumerate(lines)
                     if x.strip().startswith(", ".join(action.option_strings)))
            line = lines[i] + (lines[i + 1] if i + 1 < len(lines) and
                               not lines[i + 1].strip().startswith("-") else "")
            default = action.default
            shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
            assert "default" in line and shown in line, (name, line)


def test_demo_prints_a_table(capsys):
    assert main(["demo", "--steps", "30", "--seeds", "0"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line[:5] in
            ("muon ", "adamw", "sgd  ")}
    assert set(rows) == {"muon", "adamw", "sgd"}
    initial = float(next(line for line in out.splitlines() if line.startswith("(initial)"))
                    .split()[-1])
    final = {name: float(r[-1]) for name, r in rows.items()}
    # The demo's claim: every optimizer makes progress, Muon the most on this problem.
    assert max(final.values()) < initial / 10
    assert final["muon"] < min(final["adamw"], final["sgd"])


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "distributed_muon.launch.cli", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "usage: dmuon" in out
