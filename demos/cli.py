"""`python -m demos`: load what the flags name, build the app and serve it on 127.0.0.1 by default.

No public share link is ever requested (DeepSeek-VL2's demo used `share=True`, which tunnels the app
to the internet, issue #84). Binding to another address is possible with `--host` and prints a
warning, because the app has no authentication.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Per uploaded file: far above a camera photo, low enough that uploads cannot fill the disk quickly.
MAX_FILE_SIZE = "20mb"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m demos", description=__doc__)
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=7860)

    g = ap.add_argument_group("Chat about images")
    which = g.add_mutually_exclusive_group()
    which.add_argument("--vl-model", type=Path, help="DeepSeek-VL or DeepSeek-VL2 checkpoint folder (vl.load)")
    which.add_argument(
        "--random-tiny-vl",
        action="store_true",
        help="a small random-weight VL2-shaped model built offline (noise replies)",
    )
    g.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype for --vl-model (default: float32)")
    g.add_argument("--device", help="torch device, e.g. cuda or cpu (default: cpu)")
    g.add_argument("--seed", type=int, default=0, help="weights seed for --random-tiny-vl")

    lean = ap.add_argument_group("Prove (Lean 4): backend flags as in `python -m prover`")
    lean.add_argument(
        "--backend", choices=["repl", "kimina", "leandojo"], help="inferred from --repl-cmd / --kimina-url"
    )
    lean.add_argument("--backend-config", type=Path, help="JSON file with prover BackendConfig fields")
    lean.add_argument("--repl-cmd", help='command speaking the Lean REPL protocol, e.g. "lake exe repl"')
    lean.add_argument("--repl-cwd", help="working directory for it (the Mathlib project)")
    lean.add_argument("--kimina-url", help="Kimina Lean Server, e.g. http://127.0.0.1:8000")
    lean.add_argument("--lean-workers", type=int, default=1, help="REPL processes in the pool")
    lean.add_argument("--memory-limit-gb", type=float, default=10.0, help="RLIMIT_AS per REPL process")
    lean.add_argument("--timeout", type=float, default=300.0, help="Lean wall time per proof (s)")
    lean.add_argument("--allow-unaudited", action="store_true", help="LeanDojo cannot audit axioms; accept anyway")
    lean.add_argument("--openai-url", default="", help="pre-fill the endpoint URL of the OpenAI-compatible generator")
    lean.add_argument("--openai-model", default="", help="pre-fill its model name")
    return ap


def load_chat_engine(args: argparse.Namespace):
    """The ChatEngine the flags ask for, or None when neither --vl-model nor --random-tiny-vl is given."""
    import vl

    from .tiny import RANDOM_WEIGHTS_LABEL, build_random_tiny_vl
    from .vl_chat import ChatEngine

    if args.random_tiny_vl:
        model, processor = build_random_tiny_vl(seed=args.seed)
        if args.device:
            model = model.to(args.device)
        return ChatEngine(model, processor, RANDOM_WEIGHTS_LABEL)
    if args.vl_model:
        dtype = DTYPES[args.dtype] if args.dtype else None
        model, processor = vl.load(args.vl_model, dtype=dtype, device=args.device, tag_policy="fix")
        return ChatEngine(model, processor, f"`{args.vl_model}` ({type(model).__name__}, {args.dtype or 'float32'})")
    return None


def make_prove_service(args: argparse.Namespace):
    from .prove import LeanSettings, ProveService, make_checker

    settings = LeanSettings(
        backend=args.backend,
        repl_cmd=args.repl_cmd,
        repl_cwd=args.repl_cwd,
        kimina_url=args.kimina_url,
        lean_workers=args.lean_workers,
        memory_limit_gb=args.memory_limit_gb,
        timeout=args.timeout,
        backend_config=args.backend_config,
        allow_unaudited=args.allow_unaudited,
    )
    return ProveService(*make_checker(settings))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def launch_options(args: argparse.Namespace) -> dict:
    """`Blocks.launch` arguments: the chosen address, never a share link, and a cap on upload size."""
    return {
        "server_name": args.host,
        "server_port": args.port,
        "share": False,
        "inbrowser": False,
        "quiet": True,
        "prevent_thread_lock": True,
        "footer_links": [],
        "max_file_size": MAX_FILE_SIZE,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .app import build_app

    if not is_loopback(args.host):
        print(
            f"warning: serving on {args.host}: anyone who can reach this address can use the models and the "
            "Lean backend; the app has no authentication.",
            file=sys.stderr,
        )
    try:
        prove = make_prove_service(args)
    except ValueError as e:  # an unreadable --backend-config
        print(f"error: {e}", file=sys.stderr)
        return 2
    if prove.checker is None and (args.backend or args.repl_cmd or args.kimina_url or args.backend_config):
        # A Lean backend was asked for but cannot be used (e.g. LeanDojo not installed): the tab shows why.
        print(f"warning: no Lean backend: {prove.backend_text.splitlines()[0]}", file=sys.stderr)
    if args.vl_model or args.random_tiny_vl:
        print("loading the vision-language model ...", file=sys.stderr, flush=True)
    chat = load_chat_engine(args)
    demo = build_app(chat, prove, args.openai_url, args.openai_model)
    try:
        try:
            _, url, _ = demo.queue(default_concurrency_limit=2, max_size=32).launch(**launch_options(args))
        except OSError as e:  # the port is taken, or the address is not one of this machine's
            print(f"error: cannot listen on {args.host}:{args.port} ({e}); choose another --port", file=sys.stderr)
            return 1
        print(f"serving on {url} (no public share link); Ctrl-C to stop", file=sys.stderr, flush=True)
        demo.block_thread()
    finally:
        prove.close()
        if chat is not None:
            chat.close()
    return 0
