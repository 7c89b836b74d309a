"""Command line: `python -m prover {prove,verify,decompose,summary} ...`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .backends import BackendConfig, BackendNotConfigured, make_backend
from .checker import CheckConfig, Checker
from .dataset import VARIANT_FILES, Problem, load_few_shot, load_minif2f, statement_set_digest
from .prompts import STYLES
from .textguard import GuardPolicy


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_backend_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("Lean backend")
    g.add_argument("--backend", choices=["repl", "kimina", "leandojo"])
    g.add_argument("--backend-config", type=Path, help="JSON file with BackendConfig fields")
    g.add_argument("--repl-cmd", help='command speaking the REPL protocol, e.g. "lake exe repl"')
    g.add_argument("--repl-cwd", help="working directory for it (the Mathlib project)")
    g.add_argument("--lean-workers", type=int, help="REPL processes in the pool (default: --workers)")
    g.add_argument("--memory-limit-gb", type=float, default=10.0, help="RLIMIT_AS per REPL process")
    g.add_argument("--max-uses", type=int, help="recycle a REPL process after this many proofs")
    g.add_argument("--kimina-url")
    g.add_argument("--timeout", type=float, default=300.0, help="Lean wall time per proof (s)")
    g.add_argument("--allow", action="append", default=[], metavar="RULE",
                   help="switch off one text-layer rule by id (e.g. native_decide); repeatable")
    g.add_argument("--allow-axiom", action="append", default=[], help="add an axiom to the whitelist")


def _backend_config(args) -> BackendConfig:
    if args.backend_config:
        cfg = BackendConfig.from_file(args.backend_config)
        return cfg if args.backend is None else BackendConfig(**{**cfg.__dict__, "kind": args.backend})
    return BackendConfig(kind=args.backend, repl_cmd=args.repl_cmd, repl_cwd=args.repl_cwd,
                         workers=args.lean_workers or getattr(args, "workers", 1),
                         memory_limit_gb=args.memory_limit_gb, max_uses=args.max_uses, kimina_url=args.kimina_url)


def _checker(args) -> Checker:
    cfg = _backend_config(args)
    config = CheckConfig(timeout=args.timeout, guard=GuardPolicy(allowed=frozenset(args.allow)),
                         allowed_axioms=CheckConfig.allowed_axioms | frozenset(args.allow_axiom),
                         require_audit=cfg.kind != "leandojo" or not args.allow_unaudited)
    return Checker(make_backend(cfg), config), cfg


def _generator(args):
    from .generators import (LocalModelConfig, LocalModelGenerator, OpenAIConfig, OpenAIGenerator,
                             PortfolioGenerator)

    few_shot = load_few_shot() if args.style == "v15_few_shot" else None
    if args.generator == "portfolio":
        return PortfolioGenerator()
    if args.generator == "openai":
        return OpenAIGenerator(OpenAIConfig(base_url=args.base_url, model=args.model, style=args.style,
                                            max_tokens=args.max_tokens, max_concurrency=args.workers), few_shot)
    if not args.model_path:
        raise SystemExit("--generator local needs --model-path (a local Hugging Face checkpoint folder)")
    return LocalModelGenerator(LocalModelConfig(args.model_path, style=args.style, max_new_tokens=args.max_tokens,
                                                device=args.device, dtype=args.dtype), few_shot)


def cmd_prove(args) -> int:
    from .batch import Decomposition, RunSpec, run_batch, verification_settings
    from .decompose import DecomposeConfig
    from .generators import PortfolioGenerator

    problems = load_minif2f(args.variant, args.split)
    if args.limit:
        problems = problems[: args.limit]
    if not problems:
        raise ValueError(f"variant {args.variant} has no problems in split {args.split}")
    checker, backend_cfg = _checker(args)
    generator = _generator(args)
    decomposition = None
    if args.decompose:
        config = DecomposeConfig(strategy=args.decompose_strategy, attempts_per_lemma=args.subgoal_attempts,
                                 max_depth=0)
        decomposition = Decomposition(PortfolioGenerator(), config)
    spec = RunSpec(args.variant, args.split, statement_set_digest(problems), generator.name, args.samples,
                   tuple(p.name for p in problems), backend_cfg.to_json(),
                   verification_settings(backend_cfg.kind, checker.config),
                   decomposition.to_json() if decomposition else None)
    try:
        summary = run_batch(problems, generator, checker, spec, args.out, args.workers, decomposition)
    except KeyboardInterrupt:
        return 130
    finally:
        checker.backend.close()
    from .report import markdown_table

    print(markdown_table(summary))
    print(f"attempts: {args.out / 'attempts.jsonl'}; plot: {args.out / 'passk.png'}")
    return 0


def _problem(variant: str, name: str) -> Problem:
    problem = {p.name: p for p in load_minif2f(variant)}.get(name)
    if problem is None:
        raise ValueError(f"no problem named {name!r} in variant {variant}")
    return problem


def _audited_theorem(args) -> str:
    """The theorem `verify` audits; without one the axiom audit cannot run, so there is no verdict."""
    if args.problem and args.theorem and args.theorem != args.problem:
        raise ValueError(f"--theorem {args.theorem} and --problem {args.problem} name different theorems")
    name = args.problem or args.theorem
    if not name:
        raise ValueError("verify needs --theorem NAME (the theorem whose axioms are audited) "
                         "or --problem NAME (a miniF2F statement to pin the file to)")
    return name


def cmd_verify(args) -> int:
    from .pinning import Candidate

    theorem = _audited_theorem(args)
    problem = _problem(args.variant, args.problem) if args.problem else None
    text = args.file.read_text(encoding="utf-8")
    checker, _ = _checker(args)
    try:
        if problem:
            verdict = checker.check(problem, Candidate(text, "file")).verdict
        else:
            verdict = checker.check_unpinned(text, theorem)
    finally:
        checker.backend.close()
    print(json.dumps(verdict.to_json(), indent=1, ensure_ascii=False))
    return 0 if verdict.complete else 1


def cmd_decompose(args) -> int:
    from .decompose import DecomposeConfig, DecompositionError, Ledger, prove_by_decomposition
    from .generators import PortfolioGenerator

    problem = _problem(args.variant, args.problem)
    checker, _ = _checker(args)
    ledger = Ledger()
    config = DecomposeConfig(recursive=not args.substitute_only, strategy=args.strategy,
                             attempts_per_lemma=args.attempts, max_depth=0)
    try:
        code = prove_by_decomposition(problem, args.sketch.read_text(encoding="utf-8"), checker,
                                      PortfolioGenerator(), config, ledger)
    except DecompositionError as e:
        raise ValueError(f"cannot decompose {args.sketch}: {e}") from e
    finally:
        checker.backend.close()
    print(json.dumps({"solved": code is not None, "ledger": ledger.entries,
                      "generator_calls": ledger.generator_calls}, indent=1, ensure_ascii=False))
    if code is not None and args.out:
        args.out.write_text(code, encoding="utf-8")
    return 0 if code is not None else 1


def cmd_summary(args) -> int:
    from .attempts import AttemptLog
    from .batch import finish
    from .report import markdown_table

    path = args.run / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    problems = {p.name: p for p in load_minif2f(manifest["variant"], manifest["split"])}
    chosen = [problems[n] for n in manifest["problems"]]
    summary = finish(args.run, chosen, AttemptLog(args.run / "attempts.jsonl").load(), manifest["samples"])
    print(markdown_table(summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m prover", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prove", help="batch-prove a miniF2F split; resumable")
    p.add_argument("--dataset", choices=["minif2f"], default="minif2f")
    p.add_argument("--variant", choices=sorted(VARIANT_FILES), default="deepseek_v15")
    p.add_argument("--split", choices=["valid", "test"], default="test")
    p.add_argument("--limit", type=_positive_int, help="only the first N problems of the split")
    p.add_argument("--generator", choices=["portfolio", "openai", "local"], default="portfolio")
    p.add_argument("--style", choices=STYLES, default="v15")
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", default="deepseek-ai/DeepSeek-Prover-V2-7B")
    p.add_argument("--model-path", help="local checkpoint folder for --generator local")
    p.add_argument("--device")
    p.add_argument("--dtype")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--samples", type=_positive_int, default=1)
    p.add_argument("--workers", type=_positive_int, default=2)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--decompose", action="store_true",
                   help="V2 mode: a sample that is a `have ... := by sorry` sketch gets its subgoals solved by the "
                        "tactic portfolio, then stitched and re-verified (still one sample for pass@k)")
    p.add_argument("--decompose-strategy", choices=["inline", "aux"], default="inline")
    p.add_argument("--subgoal-attempts", type=int, default=8, help="portfolio attempts per subgoal")
    p.add_argument("--allow-unaudited", action="store_true",
                   help="LeanDojo cannot audit axioms; accept its verdicts anyway")
    _add_backend_args(p)
    p.set_defaults(func=cmd_prove)

    v = sub.add_parser("verify", help="check one Lean file: text layer, Lean, axiom audit")
    v.add_argument("file", type=Path)
    v.add_argument("--problem", help="pin the file to this miniF2F statement (and audit it)")
    v.add_argument("--theorem", help="audit this theorem's axioms; needed without --problem")
    v.add_argument("--variant", choices=sorted(VARIANT_FILES), default="deepseek_v15")
    v.add_argument("--allow-unaudited", action="store_true")
    _add_backend_args(v)
    v.set_defaults(func=cmd_verify)

    d = sub.add_parser("decompose", help="solve a V2-style sketch's subgoals with the tactic portfolio")
    d.add_argument("sketch", type=Path, help="Lean file: the theorem with `have ... := by sorry` steps")
    d.add_argument("--problem", required=True, help="miniF2F name the sketch proves (pins the statement)")
    d.add_argument("--variant", choices=sorted(VARIANT_FILES), default="deepseek_v15")
    d.add_argument("--strategy", choices=["inline", "aux"], default="inline")
    d.add_argument("--substitute-only", action="store_true",
                   help="lemma binders = theorem binders only (V2 variant a); default adds earlier haves")
    d.add_argument("--attempts", type=int, default=15, help="portfolio attempts per subgoal")
    d.add_argument("--out", type=Path, help="write the verified file here, as Lean checked it (with its import header)")
    d.add_argument("--allow-unaudited", action="store_true")
    _add_backend_args(d)
    d.set_defaults(func=cmd_decompose)

    s = sub.add_parser("summary", help="recompute summary and plot of a run directory")
    s.add_argument("run", type=Path)
    s.set_defaults(func=cmd_summary)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BackendNotConfigured as e:
        print(e, file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # bad input, missing or unreadable files: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
