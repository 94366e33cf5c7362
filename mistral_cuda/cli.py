"""The `mistral-cuda` command: generate, chat, serve, demo.

Every option is checked (sampling values, device and dtype, the prompt file) before the model
is touched, with argparse's usage message and exit status 2. The completion goes to stdout;
the loading bar, statistics, logprobs and notices go to stderr. SIGINT (Ctrl-C) ends a
`generate` with a newline and the statistics of what was generated, exit status 130.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import List, Optional, Tuple

from mistral_cuda import _C
from mistral_cuda.engine import Engine, Stream, resolve_device
from mistral_cuda.generation import CompletionOutput
from mistral_cuda.guards import ContentFilteredError, KeywordGuard, SelfReflectionGuard
from mistral_cuda.sampling import SamplingParams
from mistral_cuda.tokenizer import Tokenizer

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention

DTYPES = ("auto", "float32", "bfloat16", "float16")
API_KEY_ENV = "MISTRAL_CUDA_API_KEY"  # serve's --api-key when the flag is not given


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _token_ids(text: str) -> List[int]:
    try:
        ids = [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None
    if not ids or any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids >= 0, got {text!r}")
    return ids


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="Hugging Face or Mistral consolidated model directory")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where to run; auto picks cuda when a GPU is visible")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weight dtype; auto keeps the checkpoint's on the CPU (which computes in "
                        "float32), bfloat16 on CUDA")
    parser.add_argument("--num-blocks", type=_positive_int, default=None, metavar="N",
                        help="KV-cache blocks of 16 tokens (None: room for four full-length sequences, "
                             "capped near 8 GiB)")
    parser.add_argument("--tokenizer", default=None, metavar="FILE",
                        help="SentencePiece or Tekken file (None: the model directory's)")


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, metavar="N", help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=0.7, metavar="T", help="0 is greedy")
    g.add_argument("--top-k", type=int, default=0, metavar="K", help="keep the k most likely tokens (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (1: off)")
    g.add_argument("--min-p", type=float, default=0.0, metavar="P",
                   help="drop tokens below min-p x the best one (0: off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                   help="> 1 discourages repeats (1: off)")
    g.add_argument("--seed", type=int, default=None, metavar="S", help="0 .. 2**64-1 for reproducible sampling")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--stop-token-ids", type=_token_ids, default=None, metavar="IDS",
                   help="comma-separated token ids that end the completion")
    g.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="print each generated token's log-probability and the N most likely (0..20) to stderr")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")


def _sampling(args) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
        stop_token_ids=args.stop_token_ids,
        logprobs=args.logprobs,
        ignore_eos=args.ignore_eos,
    )


def _add_guard_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("moderation guards")
    g.add_argument("--block-word", action="append", default=None, metavar="WORD",
                   help="refuse prompts and cut answers containing WORD (whole word, any case; repeatable)")
    g.add_argument("--block-regex", action="append", default=None, metavar="REGEX",
                   help="same for a Python regular expression (repeatable)")
    g.add_argument("--self-reflection", action="store_true",
                   help="have the model classify prompts and answers with Mistral's moderation categories")


def _check_guard_args(parser: argparse.ArgumentParser, args) -> None:
    for r in getattr(args, "block_regex", None) or []:
        try:
            re.compile(r)
        except re.error as e:
            parser.error(f"--block-regex {r!r}: {e}")


def _guards(args, engine: Engine) -> list:
    patterns = list(args.block_word or []) + [re.compile(r) for r in args.block_regex or []]
    guards = [KeywordGuard(patterns)] if patterns else []
    if args.self_reflection:
        guards.append(SelfReflectionGuard(engine))
    return guards


def _flag_message(error: ValueError) -> str:
    """SamplingParams.top_p ... -> --top-p ..., so the message names the flag given."""
    return re.sub(r"SamplingParams\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(error))


def _check_device(parser: argparse.ArgumentParser, args) -> None:
    if args.device == "cuda" and not (_C.cuda_compiled() and _C.cuda_device_count() > 0):
        why = "this build has no CUDA backend" if not _C.cuda_compiled() else "no CUDA device is visible"
        parser.error(f"--device cuda: {why}; use --device cpu")
    device = resolve_device(args.device)
    if device == "cuda" and args.dtype == "float32":
        parser.error("--dtype float32: the CUDA backend computes in bfloat16 or float16")


def _read_prompt(parser: argparse.ArgumentParser, prompt: str) -> str:
    """`-` reads stdin, `@FILE` a file (one trailing newline dropped); anything else is the text."""
    if prompt == "-":
        text = sys.stdin.read()
    elif prompt.startswith("@"):
        try:
            text = Path(prompt[1:]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            parser.error(f"cannot read the prompt file {prompt[1:]!r}: {e}")
    else:
        return prompt
    text = text[:-1] if text.endswith("\n") else text
    if not text:
        parser.error(f"the prompt read from {'stdin' if prompt == '-' else prompt[1:]!r} is empty")
    return text


def _load(args) -> Engine:
    return Engine.from_pretrained(
        args.model_dir,
        device=args.device,
        dtype=None if args.dtype == "auto" else args.dtype,
        num_blocks=args.num_blocks,
        tokenizer=args.tokenizer,
    )


def stats_line(output: CompletionOutput) -> str:
    """Prompt and decode speed: prefill is timed to the first token, decode after it."""
    n_prompt, n_gen = len(output.prompt_token_ids), len(output.token_ids)
    prefill = n_prompt / output.prefill_seconds if output.prefill_seconds > 0 else float("inf")
    decode = (n_gen - 1) / output.decode_seconds if output.decode_seconds > 0 and n_gen > 1 else float("nan")
    return (
        f"prompt: {n_prompt} tokens, {prefill:.1f} tok/s | decode: {n_gen} tokens, {decode:.1f} tok/s"
        f" | finish: {output.finish_reason}"
    )


def logprob_lines(output: CompletionOutput, tokenizer: Optional[Tokenizer]) -> List[str]:
    """One tab-separated line per generated token: index, id, piece, log-probability, and the
    top tokens as id:logprob."""
    def piece(token: int) -> str:
        return repr(tokenizer.id_to_piece(token)) if tokenizer is not None else "-"

    lines = []
    for i, entry in enumerate(output.logprobs or []):
        top = " ".join(f"{t}:{lp:.6f}" for t, lp in entry.top_logprobs.items())
        lines.append(f"logprob\t{i}\t{entry.token_id}\t{piece(entry.token_id)}\t{entry.logprob:.6f}\t{top}")
    return lines


def print_stream(stream: Stream) -> Tuple[CompletionOutput, bool]:
    """Writes the deltas to stdout; on Ctrl-C stops the stream and writes the rest of what it
    had produced. Returns the output and whether it was interrupted.

    A SIGINT that arrives while a delta is being written waits until the delta is written and
    counted (a second one does not wait), so the text after the interrupt is neither lost nor
    written twice."""
    printed = 0
    writing = deferred = interrupted = False

    def on_sigint(signum, frame) -> None:
        nonlocal deferred
        if writing and not deferred:
            deferred = True
        else:
            raise KeyboardInterrupt

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if in_main_thread else None
    try:
        for delta in stream:
            writing = True
            sys.stdout.write(delta)
            sys.stdout.flush()
            printed += len(delta)
            writing = False
            if deferred:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        interrupted = True
        stream.close()
        sys.stdout.write(stream.output.text[printed:])
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return stream.output, interrupted


def _report(output: CompletionOutput, engine: Engine) -> None:
    print(stats_line(output), file=sys.stderr)
    for line in logprob_lines(output, engine.tokenizer):
        print(line, file=sys.stderr)


def cmd_generate(args, params: SamplingParams) -> int:
    engine = _load(args)
    output, interrupted = print_stream(engine.stream(args.prompt, params, guard=_guards(args, engine)))
    _report(output, engine)
    return EXIT_INTERRUPTED if interrupted else 0


def fit_conversation(
    tokenizer: Tokenizer, config, system: List[dict], turns: List[dict], max_tokens: int, safe_prompt: bool
) -> Tuple[List[int], int]:
    """The prompt ids of `system + turns` after dropping the oldest (user, assistant) pairs of
    `turns` (in place) until the prompt and max_tokens fit a full-attention model's
    max_seq_len; returns (ids, pairs dropped). The last user turn is always kept."""
    dropped = 0
    while True:
        ids = tokenizer.encode_chat(system + turns, safe_prompt=safe_prompt)
        if config.sliding_window is not None or len(ids) + max_tokens <= config.max_seq_len or len(turns) <= 1:
            return ids, dropped
        del turns[:2]
        dropped += 1


def _read_line(prompt: str) -> Optional[str]:
    sys.stdout.write(prompt)
    sys.stdout.flush()
    line = sys.stdin.readline()
    return line if line else None


def cmd_chat(args, params: SamplingParams) -> int:
    engine = _load(args)
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise _C.InvalidRequestError(
            f"chat needs a tokenizer: {args.model_dir} holds no tokenizer.model*; pass --tokenizer FILE"
        )
    guards = _guards(args, engine)
    system = [{"role": "system", "content": args.system}] if args.system else []
    turns: List[dict] = []
    print(
        "Chat: /reset clears the conversation, /exit or end of input quits; Ctrl-C stops a reply, "
        "Ctrl-C at the prompt quits.",
        file=sys.stderr,
    )
    while True:
        try:
            line = _read_line("user> ")
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            return EXIT_INTERRUPTED
        if line is None or line.strip() == "/exit":
            sys.stdout.write("\n")
            return 0
        if not line.strip():
            continue
        if line.strip() == "/reset":
            turns.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        turns.append({"role": "user", "content": line.rstrip("\n")})
        ids, dropped = fit_conversation(tokenizer, engine.config, system, turns, params.max_tokens, args.safe_prompt)
        if dropped:
            print(
                f"(dropped the oldest {dropped} exchange(s) to fit max_seq_len {engine.config.max_seq_len}"
                f"{'; the system prompt is kept' if system else ''})",
                file=sys.stderr,
            )
        try:
            stream = engine.stream(ids, params, guard=guards)
        except ContentFilteredError as e:
            print(f"[refused: {e}]", file=sys.stderr)
            turns.pop()
            continue
        except _C.Error as e:
            print(f"mistral-cuda: error: {e}", file=sys.stderr)
            turns.pop()
            continue
        sys.stdout.write("assistant> ")
        output, interrupted = print_stream(stream)
        _report(output, engine)
        if interrupted:
            print("(reply cancelled; this exchange is not kept)", file=sys.stderr)
            turns.pop()
        elif output.text:
            turns.append({"role": "assistant", "content": output.text})
        else:  # nothing to keep (blocked from the start, or an immediate EOS): the turn is dropped
            turns.pop()


def cmd_demo(args, params: Optional[SamplingParams]) -> int:
    from mistral_cuda.demo import demo_checkpoint, run_demo

    if args.print_dir:
        print(demo_checkpoint(args.cache_dir)[0])
        return 0
    return run_demo(args.cache_dir, args.device, args.max_tokens)


def cmd_serve(args, params: Optional[SamplingParams]) -> int:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"serve needs {', '.join(missing)}: pip install 'mistral-cuda[serve]'")
    if resolve_device(args.device) == "cpu" and "OMP_WAIT_POLICY" not in os.environ:
        # OpenMP workers that spin between parallel regions starve the HTTP thread and the
        # clients of CPU (3-4x lower throughput measured on 2 cores). libgomp reads the policy
        # once, when it is loaded (with mistral_cuda._C), hence the re-exec, before any loading.
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "mistral_cuda", *args.argv])
    from mistral_cuda.server import run_server

    return run_server(args)


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535, got {value}")
    return value


def _add_serve_args(serve: argparse.ArgumentParser) -> None:
    from mistral_cuda.async_engine import DEFAULT_MAX_WAITING_REQUESTS

    _add_model_args(serve)
    g = serve.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    g.add_argument("--port", type=_port, default=8000, help="TCP port")
    g.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on every route but /health (else ${API_KEY_ENV})")
    g.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model name clients send (None: the model directory's name)")
    g.add_argument("--max-num-seqs", type=_positive_int, default=64, metavar="N",
                   help="sequences the scheduler runs together")
    g.add_argument("--max-num-batched-tokens", type=_positive_int, default=2048, metavar="N",
                   help="tokens of one step: decode tokens first, prompt chunks in the rest")
    g.add_argument("--max-waiting-requests", type=_positive_int, default=DEFAULT_MAX_WAITING_REQUESTS, metavar="N",
                   help="sequences admitted but not running before new requests get 503")
    g.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level")


def _check_serve(parser: argparse.ArgumentParser, args) -> None:
    _check_device(parser, args)
    if args.api_key is None:
        args.api_key = os.environ.get(API_KEY_ENV) or None
    if args.api_key is not None and not args.api_key.strip():
        parser.error("--api-key: the key is empty")
    if args.served_model_name is not None and not args.served_model_name.strip():
        parser.error("--served-model-name: the name is empty")
    if not Path(args.model_dir).is_dir():
        parser.error(f"MODEL_DIR {args.model_dir!r} is not a directory")


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="mistral-cuda", description=__doc__.split("\n\n")[0], formatter_class=formatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser(
        "generate", help="complete a prompt (plain text, no chat template)", formatter_class=formatter
    )
    _add_model_args(generate)
    generate.add_argument("prompt", help="the text; - reads it from stdin, @FILE from a file")
    _add_sampling_args(generate)
    _add_guard_args(generate)
    generate.set_defaults(run=cmd_generate, parser=generate, sampled=True)

    chat = commands.add_parser(
        "chat", help="interactive multi-turn chat with the [INST] template", formatter_class=formatter
    )
    _add_model_args(chat)
    chat.add_argument("--system", default=None, metavar="TEXT", help="system prompt")
    chat.add_argument("--safe-prompt", action="store_true", help="add Mistral's guardrail system prompt")
    _add_sampling_args(chat)
    _add_guard_args(chat)
    chat.set_defaults(run=cmd_chat, parser=chat, sampled=True)

    from mistral_cuda.demo import default_cache_dir

    demo = commands.add_parser(
        "demo", help="run the whole path on a small random-weight model", formatter_class=formatter
    )
    demo.add_argument("--cache-dir", default=default_cache_dir(), metavar="DIR",
                      help="where the demo checkpoint is kept")
    demo.add_argument("--max-tokens", type=_positive_int, default=64, metavar="N", help="tokens to decode")
    demo.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run")
    demo.add_argument("--print-dir", action="store_true",
                      help="build the demo checkpoint if needed, print its directory and exit (for serve)")
    demo.set_defaults(run=cmd_demo, parser=demo, sampled=False)

    serve = commands.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)",
        formatter_class=formatter,
    )
    _add_serve_args(serve)
    serve.set_defaults(run=cmd_serve, parser=serve, sampled=False)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    params = None
    if args.sampled:
        try:
            params = _sampling(args)
        except ValueError as e:
            args.parser.error(_flag_message(e))
        _check_device(args.parser, args)
        _check_guard_args(args.parser, args)
        if getattr(args, "prompt", None) is not None:
            args.prompt = _read_prompt(args.parser, args.prompt)
    elif args.command == "serve":
        _check_serve(args.parser, args)
    try:
        return args.run(args, params)
    except KeyboardInterrupt:
        print("\nmistral-cuda: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (_C.Error, ValueError, TypeError, OSError, RuntimeError, MemoryError) as e:
        print(f"mistral-cuda: error: {e}", file=sys.stderr)
        return 1
