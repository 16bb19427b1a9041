import subprocess
import sys

from diffalign import __version__


def run(*args):
    return subprocess.run([sys.executable, "-m", "diffalign", *args], capture_output=True, text=True)


def test_help_lists_the_subcommands():
    out = run("--help")
    assert out.returncode == 0
    for cmd in ["version", "pretrain", "sample", "train", "eval", "search", "report", "serve-reward"]:
        assert cmd in out.stdout


def test_version():
    out = run("version")
    assert out.returncode == 0 and out.stdout.strip() == __version__
