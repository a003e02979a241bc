import subprocess
import sys

from distributed_muon.launch.cli import main

from distributed_muon import __version__


def test_help_and_version(capsys):
    assert main([]) == 0
    assert "demo" in capsys.readouterr().out
    assert main(["version"]) == 0
    assert __version__ in capsys.readouterr().out


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
