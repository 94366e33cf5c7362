"""The `mistral-cuda` command: generate, chat, demo."""

from __future__ import annotations

import argparse
import re
import sys
from typing import List, Optional

from mistral_cuda import _C
from mistral_cuda.engine import Engine, Stream
from mistral_cuda.generation import CompletionOutput
from mistral_cuda.guards import ContentFilteredError, KeywordGuard, SelfReflectionGuard
from mistral_cuda.sampling import SamplingParams


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="Hugging Face or Mistral consolidated model directory")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    parser.add_argument("--tokenizer", default=None, help="SentencePiece or Tekken file (default: the model directory's)")


def _add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
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


def _guards(args, engine: Engine) -> list:
    guards = []
    patterns = list(args.block_word or [])
    for r in args.block_regex or []:
        try:
            patterns.append(re.compile(r))
        except re.error as e:
            raise ValueError(f"--block-regex {r!r}: {e}") from None
    if patterns:
        guards.append(KeywordGuard(patterns))
    if args.self_reflection:
        guards.append(SelfReflectionGuard(engine))
    return guards


def _load(args) -> Engine:
    return Engine.from_pretrained(args.model_dir, device=args.device, tokenizer=args.tokenizer)


def stats_line(output: CompletionOutput) -> str:
    """Prompt and decode speed: prefill is timed to the first token, decode after it."""
    n_prompt, n_gen = len(output.prompt_token_ids), len(output.token_ids)
    prefill = n_prompt / output.prefill_seconds if output.prefill_seconds > 0 else float("inf")
    decode = (n_gen - 1) / output.decode_seconds if output.decode_seconds > 0 and n_gen > 1 else float("nan")
    return (
        f"prompt: {n_prompt} tokens, {prefill:.1f} tok/s | decode: {n_gen} tokens, {decode:.1f} tok/s"
        f" | finish: {output.finish_reason}"
    )


def _print_stream(stream: Stream) -> CompletionOutput:
    for delta in stream:
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return stream.output


def cmd_generate(args) -> None:
    engine = _load(args)
    output = _print_stream(engine.stream(args.prompt, _sampling(args), guard=_guards(args, engine)))
    print(stats_line(output), file=sys.stderr)


def cmd_chat(args) -> None:
    engine = _load(args)
    params = _sampling(args)
    guards = _guards(args, engine)
    messages: List[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("Chat: an empty line is skipped, /exit or end of input quits.", file=sys.stderr)
    while True:
        sys.stdout.write("user> ")
        sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            sys.stdout.write("\n")
            return
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        try:
            stream = engine.stream_chat(messages, params, safe_prompt=args.safe_prompt, guard=guards)
        except ContentFilteredError as e:
            print(f"[refused: {e}]", file=sys.stderr)
            messages.pop()
            continue
        sys.stdout.write("assistant> ")
        output = _print_stream(stream)
        print(stats_line(output), file=sys.stderr)
        if output.text:
            messages.append({"role": "assistant", "content": output.text})
        else:  # nothing to keep (blocked from the start): the turn is dropped
            messages.pop()


def cmd_demo(args) -> None:
    from mistral_cuda.demo import DEMO_SHAPE, demo_checkpoint

    path, cached = demo_checkpoint(args.cache_dir)
    shape = ", ".join(f"{k} {v}" for k, v in DEMO_SHAPE.items())
    print(f"Demo model ({shape}) {'cached at' if cached else 'built at'} {path}")
    print("Its weights are RANDOM: expect gibberish text. It shows the pipeline and its speed.")
    engine = Engine.from_pretrained(path, device=args.device)
    messages = [{"role": "user", "content": "Write a short poem about fast inference on GPUs."}]
    tokenizer = engine.tokenizer
    prompt_ids = tokenizer.encode_chat(messages)
    pieces = "".join(tokenizer.id_to_piece(i) for i in prompt_ids)
    print(f"Chat template ({tokenizer.version} tokenizer), as pieces: {pieces}")
    print(f"Prompt: {len(prompt_ids)} tokens; decoding {args.max_tokens} tokens on {engine.device}:")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.8, top_p=0.95, seed=0, ignore_eos=True)
    output = _print_stream(engine.stream(prompt_ids, params))
    print(stats_line(output))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mistral-cuda", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="complete a prompt (plain text, no chat template)")
    _add_model_args(generate)
    generate.add_argument("prompt")
    _add_sampling_args(generate)
    _add_guard_args(generate)
    generate.set_defaults(run=cmd_generate)

    chat = commands.add_parser("chat", help="interactive multi-turn chat with the [INST] template")
    _add_model_args(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--safe-prompt", action="store_true", help="add Mistral's guardrail system prompt")
    _add_sampling_args(chat)
    _add_guard_args(chat)
    chat.set_defaults(run=cmd_chat)

    from mistral_cuda.demo import default_cache_dir

    demo = commands.add_parser("demo", help="run the whole path on a small random-weight model")
    demo.add_argument("--cache-dir", default=default_cache_dir(), help="where the demo checkpoint is kept")
    demo.add_argument("--max-tokens", type=int, default=64)
    demo.add_argument("--device", default="auto")
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        return 130
    except (_C.Error, ValueError, TypeError, OSError, RuntimeError) as e:
        print(f"mistral-cuda: error: {e}", file=sys.stderr)
        return 1
    return 0
