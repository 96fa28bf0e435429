"""`mome`: every pipeline stage as a subcommand.

    mome corpus fetch --config configs/small.yaml
    mome corpus build --config configs/small.yaml
    mome tokenizer    --config configs/small.yaml
    mome teacher      --config configs/small.yaml teacher.train.max_steps=100
    mome teacher-logits --config configs/small.yaml teacher_logits.top_k=64
    mome distill      --config configs/small.yaml distill.langs=[fr] distill.alpha.strategy=adaptive
    mome sweep kd     --config configs/small.yaml
    mome router       --config configs/small.yaml
    mome sweep router --config configs/small.yaml
    mome moe          --config configs/small.yaml
    mome forgetting   --config configs/small.yaml
    mome add-expert   --config configs/small.yaml --lang es --source PATH
    mome report       runs/small
    mome serve        runs/small --config configs/small.yaml
    mome pipeline     --config configs/small.yaml

`a.b=c` arguments override the config; options and overrides come in any order. Connects to RAY_ADDRESS
when set, else starts a local Ray cluster on 127.0.0.1. A user mistake prints one clear line and exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from mome_ray.errors import MomeError


# `mome sweep ACTION`: what each sweep does (its function is `stages.SWEEPS[ACTION]`).
SWEEPS_HELP = {
    "kd": "alpha strategies x KD losses x temperature for one expert, each with paired seeds (claims 1-2)",
    "router": "features x classifiers for the router (tune_spaces/router.yaml); the best is saved",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mome", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="STAGE")

    def stage(name: str, help: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help, description=help)
        s.add_argument("--config", "-c", help="YAML preset (configs/tiny.yaml, small.yaml, paper.yaml)")
        s.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
        return s

    corpus = sub.add_parser("corpus", help="fetch real text and build the balanced corpus")
    csub = corpus.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help in (("fetch", "download the Debian packages the sources need into the cache"),
                       ("build", "extract, clean, balance and split the corpus into RUN_DIR/corpus")):
        s = csub.add_parser(name, help=help, description=help)
        s.add_argument("--config", "-c")
        s.add_argument("overrides", nargs="*", metavar="key.path=value")
    stage("tokenizer", "train the byte-level BPE tokenizer on all languages into RUN_DIR/tokenizer")
    t = stage("teacher", "train the GPT-2 teacher with Ray Train (DDP) into RUN_DIR/teacher")
    t.add_argument("--fresh", action="store_true", help="ignore an interrupted run's checkpoints")
    stage("teacher-logits", "cache the teacher's top-k log-probs of the training blocks into RUN_DIR/teacher_logits "
                            "(read by KD runs with distill.teacher=cached)")
    stage("router", "train the sequence -> language router into RUN_DIR/router and print its metrics")
    d = stage("distill", "distil one expert per language from the teacher, in parallel, into RUN_DIR/experts")
    d.add_argument("--fresh", action="store_true", help="re-train every student, ignoring finished and "
                   "interrupted runs")
    sweep = sub.add_parser("sweep", help="Ray Tune sweeps (search spaces in tune_spaces/)")
    ssub = sweep.add_subparsers(dest="action", required=True, metavar="SWEEP")
    for name, help in SWEEPS_HELP.items():
        s = ssub.add_parser(name, help=help, description=help)
        s.add_argument("--config", "-c")
        s.add_argument("overrides", nargs="*", metavar="key.path=value")
    m = stage("moe", "train JEET and MoE-CE, assemble PLE, run the evaluation grid into RUN_DIR/moe")
    m.add_argument("--fresh", action="store_true", help="re-train JEET and MoE-CE")
    stage("forgetting", "sequential vs balanced vs JEET vs separate experts: forgetting per language into "
                        "RUN_DIR/forgetting")
    a = stage("add-expert", "distil one new language expert from a folder of text and add it to the MoE")
    a.add_argument("--lang", required=True, help="the new language's code (e.g. es)")
    a.add_argument("--source", required=True, help="a folder of text files in that language")
    r = sub.add_parser("report", help="write RUN_DIR/report.md + PNG plots of every stage that has run")
    r.add_argument("run_dir", help="the run directory (e.g. runs/small)")
    # `mome serve` is the app layer's own command (serve/launch.py): listed here, run there.
    sub.add_parser("serve", help="serve the run's router + experts over HTTP with Ray Serve (`mome serve --help`)")
    pl = stage("pipeline", "run every stage in order, skipping the ones already up to date")
    pl.add_argument("--force", action="store_true", help="re-run every stage")
    return p


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`parser.parse_args`, with options and `key=value` overrides in any order.

    argparse fills a `nargs="*"` positional from the first run of positionals only (often an empty one before
    the first option), so an override after an option comes back unparsed: it joins `overrides`, in order.
    """
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # the app layer's entry point, in this process (the library never imports it)
        os.execv(sys.executable, [sys.executable, "-m", "serve.launch", *argv[1:]])
    args = parse_args(_parser(), argv)
    try:
        from mome_ray import stages
        from mome_ray.settings import load_settings

        if args.cmd == "report":
            from mome_ray.report import write_report

            print(f"report: {write_report(args.run_dir)}")
            return 0
        cfg = load_settings(args.config, args.overrides)
        if args.cmd == "corpus":
            stages.fetch(cfg) if args.action == "fetch" else stages.corpus(cfg)
        elif args.cmd == "tokenizer":
            stages.tokenizer(cfg)
        elif args.cmd == "teacher":
            stages.teacher(cfg, fresh=args.fresh)
        elif args.cmd == "teacher-logits":
            stages.teacher_logits(cfg)
        elif args.cmd == "router":
            stages.router(cfg)
        elif args.cmd == "distill":
            stages.experts(cfg, fresh=args.fresh)
        elif args.cmd == "sweep":
            stages.SWEEPS[args.action](cfg)
        elif args.cmd == "moe":
            stages.moe(cfg, fresh=args.fresh)
        elif args.cmd == "forgetting":
            stages.forgetting(cfg)
        elif args.cmd == "add-expert":
            from mome_ray.add_expert import add_expert

            add_expert(cfg, args.lang, args.source)
        elif args.cmd == "pipeline":
            stages.run_pipeline(cfg, force=args.force)
    except MomeError as e:
        print(f"mome {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
