"""``python -m dgemma``: a minimal command line until the full CLI (live canvas view, chat) lands.

Parses, builds an Engine, calls it, prints. User mistakes print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from dgemma.errors import DgemmaError

# Sampling options exposed as flags, with the generation_config.json names.
SAMPLING_OPTIONS = (("max_new_tokens", int), ("max_denoising_steps", int), ("entropy_bound", float),
                    ("t_max", float), ("t_min", float), ("stability_threshold", int),
                    ("confidence_threshold", float), ("seed", int))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dgemma", description="Block-diffusion text generation (DiffusionGemma).")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete a prompt (or stdin)")
    gen.add_argument("prompt", nargs="?", help="prompt text; read from stdin when omitted")
    gen.add_argument("--model", required=False, help="checkpoint directory or Hugging Face repo id")
    gen.add_argument("--device", default=None)
    gen.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: the checkpoint's)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--json", action="store_true", help="print text, token ids and steps per canvas as JSON")
    for name, kind in SAMPLING_OPTIONS:
        gen.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None)
    args = parser.parse_args(argv)

    if args.model is None:
        parser.exit(2, "dgemma: no embedded default model ships yet; pass --model DIR_OR_HUB_ID\n")
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    overrides = {k: getattr(args, k) for k, _ in SAMPLING_OPTIONS if getattr(args, k) is not None}
    try:
        import dgemma

        engine = dgemma.load(args.model, device=args.device, dtype=args.dtype)
        if args.chat:
            reply = engine.chat([{"role": "user", "content": prompt}], **overrides)
            completion, text = reply.completion, reply.answer
        else:
            completion = engine.generate(prompt, **overrides)
            text = completion.text
    except (DgemmaError, ValueError) as e:
        parser.exit(2, f"dgemma: {e}\n")
    if args.json:
        print(json.dumps({"text": text, "token_ids": completion.token_ids, "steps": completion.steps,
                          "finish_reason": completion.finish_reason}))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
