"""CLI: help lists every stage; user mistakes exit 2 with one clear line, no traceback."""

import subprocess
import sys
from pathlib import Path

from mome_ray.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_the_stages():
    out = subprocess.run([sys.executable, "-m", "mome_ray.cli", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120).stdout
    for stage in ("corpus", "tokenizer", "teacher", "teacher-logits", "distill", "sweep", "pipeline"):
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


def test_distill_on_an_empty_run_dir_says_which_command_makes_its_input(tmp_path, capsys):
    assert main(["distill", "--config", str(ROOT / "configs/tiny.yaml"), f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "no 'tokenizer' artifact" in err and "run 'mome tokenizer" in err and "Traceback" not in err


def test_sweep_needs_a_known_sweep(capsys):
    try:
        main(["sweep", "nope"])
    except SystemExit as e:
        assert e.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_bad_kd_loss_exits_2(capsys):
    assert main(["distill", "--config", str(ROOT / "configs/tiny.yaml"), "distill.kd_loss=kl"]) == 2
    assert "distill.kd_loss 'kl' is not one of" in capsys.readouterr().err


def test_serve_is_the_app_layers_command_with_options_anywhere(tmp_path):
    from serve.launch import _parser

    # `mome serve` hands over to serve/launch.py (the library never imports the app); overrides may come
    # before or after the options, as in every other mome command.
    args = _parser().parse_intermixed_args(["runs/x", "serve.teacher=false", "--port", "8100", "serve.x=1"])
    assert args.port == 8100 and args.overrides == ["serve.teacher=false", "serve.x=1"]
    out = subprocess.run([sys.executable, "-m", "mome_ray.cli", "serve", str(tmp_path / "none"), "--port", "8100",
                          "serve.teacher=false"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "no MoE artifact" in out.stderr and "Traceback" not in out.stderr


def test_the_library_never_imports_the_app_layer():
    code = ("import sys, mome_ray.cli, mome_ray.stages, mome_ray.serving, mome_ray.report; "
            "print([m for m in sys.modules if m.split('.')[0] in ('serve', 'jobs', 'tune_spaces')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
