"""Every way a run departs from the paper (arXiv 2407.19610) and its public code, read from the run's config.

    rows = deviations_table(load_settings("configs/paper.yaml"))   # [Deviation(aspect, paper, ours, how), ...]
    print(deviations_markdown(rows))                                # the report's "Deviations from the paper"

`paper` is what /work/shared/PAPER.md records of the paper and of its public code (which differ in places);
`ours` is what this config does, so the same aspect reads "as the paper" under `configs/paper.yaml` and as a
deviation under `small`; `how` names the config key that changes it, or says that we fixed a bug of the
public code for good. Only what the paper or its code pins down is compared; where they are silent, the row
says so.
"""

from __future__ import annotations

from typing import NamedTuple

FIXED = "not configurable: a bug of the public code, avoided"


class Deviation(NamedTuple):
    aspect: str
    paper: str  # the paper and/or its public code
    ours: str  # this config
    how: str  # the config key that changes it


def _size(m) -> str:
    return f"{m.n_layer} layer{'s' * (m.n_layer != 1)} × {m.n_embd}, {m.n_head} heads, context {m.n_positions}"


def _loss(recipe) -> str:
    return {"reverse_kl": "reverse KL(p_S ‖ p_T)", "forward_kl": "forward KL(p_T ‖ p_S)",
            "jsd": f"JSD, β = {recipe.jsd_beta}", "skew_kl": f"skew KL, λ = {recipe.skew}"}[recipe.kd_loss]


def _alpha(a) -> str:
    return {"fixed": f"fixed α = {a.alpha}", "adaptive": f"adaptive from α = {a.alpha}",
            "alternating": "alternating CE / KD steps"}[a.strategy]


def _owned(on: bool) -> str:
    return "one per expert (as the paper's code)" if on else "shared by every expert"


def _sources(corpus) -> str:
    if corpus.user_dir:
        return f"your own files in {corpus.user_dir}"
    by_lang: dict[str, list[str]] = {}
    for s in corpus.sources:
        by_lang.setdefault(s.lang, []).append(s.name + (" (test only)" if s.holdout else ""))
    return "; ".join(f"{lang}: {', '.join(names)}" for lang, names in by_lang.items())


def _pairs(cfg) -> str:
    code = [c for c in cfg.corpus.code_langs if c in cfg.langs]
    natural = [l for l in cfg.langs if l not in cfg.corpus.code_langs]
    if not code or not natural:
        return "none: the run needs a code language (corpus.code_langs) and a natural one among `langs`"
    return (f"{', '.join(natural)} each with {', '.join(code)}: hidden mean (JEET, MoE-CE), distribution mean (PLE: "
            f"whole models)")


def _model_rows(cfg) -> list[Deviation]:
    t = cfg.teacher.train
    return [
        Deviation("teacher size", "GPT-2 Medium: 24 layers × 1024, 16 heads (≈0.34B), context 1024",
                  _size(cfg.teacher.model), "teacher.model"),
        Deviation("teacher training", "AdamW lr 5e-5, 5 % warmup, linear decay, weight decay 0.05, clip 1.0, bf16, "
                  "3 epochs of balanced batches",
                  f"AdamW lr {t.lr:g}, {100 * t.warmup_frac:g} % warmup, linear decay, weight decay {t.weight_decay:g}, "
                  f"clip {t.grad_clip:g}, {'bf16 on GPU' if t.bf16 else 'fp32'}, {t.max_steps} steps of balanced batches",
                  "teacher.train"),
        Deviation("single-language students", "GPT-2 6 layers × 768, 12 heads (≈68M)", _size(cfg.distill.model),
                  "distill.model"),
        Deviation("multilingual student baseline", "3 layers × 768",
                  f"the students' size ({_size(cfg.distill.model)}), at equal compute"
                  + (" and at equal tokens per language" if cfg.distill.equal_tokens else ""),
                  "distill.model, distill.equal_tokens"),
        Deviation("MoE expert stacks", "GPT-2 blocks, 3 layers × 768, 6 heads, one per language",
                  _size(cfg.moe.model), "moe.model"),
    ]


def _data_rows(cfg) -> list[Deviation]:
    c = cfg.corpus
    return [
        Deviation("data", "Wiki40B en/fr/de (only articles present in every language) + Python code from an "
                  "unpublished source", _sources(c), "corpus.sources, corpus.user_dir"),
        Deviation("language balance", "greedy: every language within 5 % of the smallest (tokens)",
                  f"every language within {100 * c.tolerance:g} % of the smallest, per split (tokens, at most "
                  f"{', '.join(f'{k} {v:,}' for k, v in c.max_tokens.items())})", "corpus.tolerance, corpus.max_tokens"),
        Deviation("tokenizer", "BPE, 32,000 tokens, trained on the four languages together",
                  f"byte-level BPE, {cfg.tokenizer.vocab_size:,} tokens, trained on {', '.join(cfg.langs)} together",
                  "tokenizer.vocab_size"),
    ]


def _kd_rows(cfg) -> list[Deviation]:
    d, m = cfg.distill, cfg.moe
    return [
        Deviation("KD loss", "stated: reverse KL(p_S ‖ p_T); the code computes −Σ p_T log p_S (forward KL + a "
                  "constant) and calls it \"inverse KL\"",
                  f"students: {_loss(d)}; JEET / MoE-CE: {_loss(m)} (each divergence named for what it computes)",
                  "distill.kd_loss, moe.kd_loss (+ jsd_beta, skew)"),
        Deviation("KD temperature", "none recorded (τ = 1)", f"students τ = {d.temperature:g}; JEET / MoE-CE τ = "
                  f"{m.temperature:g}", "distill.temperature, moe.temperature"),
        Deviation("α strategy", "the code: adaptive (\"differential weights\") from α = 0.5, β = 1 − α; the paper "
                  "also compares fixed and alternating", f"students: {_alpha(d.alpha)}; JEET / MoE-CE: {_alpha(m.alpha)}",
                  "distill.alpha, moe.alpha"),
        Deviation("adaptive α update", "every micro-batch; divides by zero when both weights are 0",
                  f"once per optimizer step over the last max({d.alpha.min_window}, steps/100) losses; α kept when "
                  "both weights are 0", FIXED + " (the window: distill.alpha.min_window)"),
    ]


def _moe_rows(cfg) -> list[Deviation]:
    p = cfg.moe.parts
    return [
        Deviation("JEET / MoE-CE position embedding", "one per expert", _owned(p.expert_wpe), "moe.parts.expert_wpe"),
        Deviation("JEET / MoE-CE final LayerNorm", "one per expert", _owned(p.expert_ln_f), "moe.parts.expert_ln_f"),
        Deviation("JEET / MoE-CE LM head", "one head shared by the experts, untied from the token embedding, with a "
                  "bias", "untied, with a bias (as the paper's code)" if p.untied_head
                  else "tied to the token embedding, no bias (as GPT-2)", "moe.parts.untied_head"),
        Deviation("MoE-CE combination", "plain mean of the common and the selected expert's last hidden states",
                  "a learned gate per expert (beyond the paper)" if cfg.moe.gate else "plain mean (as the paper)",
                  "moe.gate"),
        Deviation("average of all experts", "the experts' last hidden states averaged, then the head",
                  "two grid rows: distribution mean (every MoE) and hidden mean (JEET, MoE-CE; PLE's whole models "
                  "can only mix distributions)", "always both (MoE(..., mix='probs' | 'hidden'))"),
        Deviation("language + Python pair rows", "each language's expert with Python's", _pairs(cfg),
                  "corpus.code_langs"),
    ]


def _router_rows(cfg) -> list[Deviation]:
    r = cfg.router
    params = lambda d: f" {d}" if d else ""  # noqa: E731
    return [
        Deviation("router", "TF-IDF over token-id unigrams + LogisticRegression (C = 1, lbfgs), trained on whole "
                  "training sequences",
                  f"{r.features}{params(r.feature_params)} + {r.classifier}{params(r.classifier_params)}, trained on "
                  f"windows of {r.min_window}-{r.sequence_length} tokens; below {r.unknown_below:g} confidence: unknown",
                  "router.* (mome sweep router)"),
        Deviation("router calls", "once per batch, the whole batch flattened into one string (right only because "
                  "every batch is one language)", "once per sequence", FIXED),
        Deviation("router token pattern", "scikit-learn's default TF-IDF pattern silently drops one-digit token ids",
                  "every id counts (pattern \\S+)", FIXED),
        Deviation("router storage", "pickle", "skops with a trusted-type list, checked by sha256", FIXED),
    ]


def _eval_rows(cfg) -> list[Deviation]:
    e = cfg.eval
    blocks = "the whole split" if e.max_blocks == 0 else f"{e.max_blocks} evenly spaced blocks"
    return [
        Deviation("evaluation split", "per-language loss and perplexity; the split and sample are not pinned down",
                  f"the {e.split} split, {blocks} per language, the same blocks for every model; selection on "
                  "validation", "eval.split, eval.max_blocks"),
        Deviation("evaluation intervals", "none recorded: point estimates",
                  f"95 % bootstrap intervals by document ({e.bootstrap} resamples); a difference inside them is "
                  "\"no difference\"", "eval.bootstrap"),
        Deviation("forgetting study", "sequential training forgets; the code has no sequential script (order and "
                  "steps unspecified)",
                  f"sequential ({' → '.join(cfg.langs)}), balanced, JEET and separate experts, {cfg.forgetting.train.max_steps}"
                  " steps each", "forgetting.*"),
    ]


def deviations_table(cfg) -> list[Deviation]:
    """Every deviation from the paper and its public code under `cfg` (a `settings.Settings`)."""
    return _model_rows(cfg) + _data_rows(cfg) + _kd_rows(cfg) + _moe_rows(cfg) + _router_rows(cfg) + _eval_rows(cfg)


def deviations_markdown(rows: list[Deviation]) -> str:
    cell = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| aspect | paper / its public code | ours (this run) | configurable |", "|---|---|---|---|"]
    return "\n".join(lines + [f"| {' | '.join(cell(c) for c in row)} |" for row in rows]) + "\n"
