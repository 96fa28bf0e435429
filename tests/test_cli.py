"""CLI: help lists every stage; options and overrides in any order; user mistakes exit 2 with one clear line."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from mome_ray.cli import _parser, main, parse_args

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


def commands(parser: argparse.ArgumentParser, path: tuple = ()):
    """(words, parser) of every command the parser ends in (`corpus fetch`, `teacher`, ...)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for sub in subs:
        for name, child in sub.choices.items():
            yield from commands(child, (*path, name))


def test_every_command_takes_options_and_overrides_in_any_order():
    from serve.launch import _parser as serve_parser

    tried = 0
    for words, parser in [*commands(_parser()), (("serve", "runs/x"), serve_parser())]:
        if not any(a.dest == "overrides" for a in parser._actions):
            continue  # `report RUN_DIR` takes none: an override there is an error (below)
        options = [(a.option_strings[0], "v" if a.nargs is None else None) for a in parser._actions
                   if a.option_strings and a.dest not in ("help", "config")
                   and (a.required or a.nargs == 0 or a.type is int)]
        tail = [x for opt, value in options for x in ([opt] if value is None else [opt, "1"])]
        argv = [*words, "a.b=1", "--config", "c.yaml", "c.d=2", *tail, "e.f=3"]
        args = parse_args(_parser() if words[0] != "serve" else serve_parser(), argv[words[0] == "serve":])
        assert args.config == "c.yaml" and args.overrides == ["a.b=1", "c.d=2", "e.f=3"], argv
        tried += 1
    assert tried >= 13  # every stage, both corpus actions, both sweeps and serve
    for argv in (["report", "runs/x", "a.b=1"], ["teacher", "--config", "c.yaml", "--frsh"]):
        with pytest.raises(SystemExit):
            parse_args(_parser(), argv)


def test_serve_is_the_app_layers_command(tmp_path):
    # `mome serve` hands over to serve/launch.py (the library never imports the app), options anywhere
    out = subprocess.run([sys.executable, "-m", "mome_ray.cli", "serve", str(tmp_path / "none"), "--port", "8100",
                          "serve.teacher=false"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "no MoE artifact" in out.stderr and "Traceback" not in out.stderr


def test_the_library_never_imports_the_app_layer():
    code = ("import sys, mome_ray.cli, mome_ray.stages, mome_ray.serving, mome_ray.report; "
            "print([m for m in sys.modules if m.split('.')[0] in ('serve', 'jobs', 'tune_spaces')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
