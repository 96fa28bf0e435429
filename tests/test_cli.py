"""CLI: help lists every stage; user mistakes exit 2 with one clear line, no traceback."""

import subprocess
import sys
from pathlib import Path

from mome_ray.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_the_stages():
    out = subprocess.run([sys.executable, "-m", "mome_ray.cli", "--help"], capture_output=True, text=True,
                         cwd=ROOT).stdout
    for stage in ("corpus", "tokenizer", "teacher", "pipeline"):
        assert stage in out


def test_bad_key_exits_2_with_a_message(capsys):
    assert main(["teacher", "--config", str(ROOT / "configs/tiny.yaml"), "teacher.trian.lr=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'teacher.trian'" in err and "Traceback" not in err


def test_empty_user_dir_exits_2(tmp_path, capsys):
    for lang in ("en", "fr", "de", "py"):
        (tmp_path / lang).mkdir()
    code = main(["corpus", "build", "--config", str(ROOT / "configs/tiny.yaml"), f"run_dir={tmp_path / 'run'}",
                 f"corpus.user_dir={tmp_path}"])
    assert code == 2 and "has no .txt" in capsys.readouterr().err
    assert not (tmp_path / "run" / "corpus").exists()  # nothing half-written
