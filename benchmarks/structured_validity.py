"""How many structured outputs parse and validate: random JSON Schemas through ``Engine.generate(json_schema=)``.

Draws ``--schemas`` random schemas within the supported subset of ``dgemma.structured`` from a seeded
``random.Random`` (nested objects with properties / required / additionalProperties, arrays with items and
minItems / maxItems, strings with lengths, enums, consts and simple patterns, integers and numbers with
inclusive and exclusive bounds, booleans, null, unions with null as ``type: [X, "null"]`` and ``anyOf``, enums
of mixed values; containers nested up to ``--depth`` deep). A random-weight preset (fp32) with the byte
tokenizer of its vocabulary writes ``--rows`` answers per schema and seed in one batched call (fixed, few
denoising steps), and every answer goes through ``json.loads`` and ``jsonschema`` (Draft 2020-12). This is a
measurement of the guarantee, not a test: it prints the counts and writes them, with the layout sizes (answer
tokens, how many layouts span more than one canvas) and up to five failing examples, as JSON.

    OMP_NUM_THREADS=1 python benchmarks/structured_validity.py --schemas 300 --seeds 2 --rows 3 \\
        --json docs/bench/structured-validity-tiny.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import statistics
import string
import sys
import time

import jsonschema
import torch

from dgemma import loading
from dgemma.bench.harness import BenchSpec, build
from dgemma.bench.presets import preset_config
from dgemma.engine import Engine
from dgemma.fileio import atomic_write_text
from dgemma.structured import SchemaError, check_schema, request_plan
from dgemma.tokenizer import byte_tokenizer

NAMES = ["id", "name", "age", "tags", "x y", "n2", "ü", "kind", "note", "items", "a\"b", "v"]
PATTERNS = [r"^[a-z]{2,5}$", r"^\d{3}-\d{4}$", r"^[A-Z][a-z]+$", r"^[0-9a-f]{4,8}$", r"^v\d+\.\d+$",
            r"^[a-z]+@[a-z]+\.com$", r"^\w{1,4}$", r"^[A-Z_]{2}\d?$", r"[a-z]", r"^x-\d*$", r"^.{0,3}$",
            r"^[^a-z\"]{1,3}$", r"^\d{5}$", r"^#[0-9A-F]{6}$"]
WORDS = ["a", "b", "admin", "reader", "é", "x y", "", "q\"uote", "back\\slash", "日本"]
MIXED = [None, True, False, 0, 1, -7, 42, 2.5, "a", "", "red", [1, 2], {"k": "v"}]


class SchemaGen:
    """Random schemas within the supported subset (``depth``: most nested containers)."""

    def __init__(self, rng: random.Random, depth: int = 3):
        self.rng, self.depth = rng, depth

    def schema(self) -> dict:
        s = self.node(0)
        return self.nullable(s) if self.rng.random() < 0.15 else s

    def node(self, level: int) -> dict:
        r = self.rng.random()
        if level < self.depth and r < (0.9 if level == 0 else 0.45):
            s = self.obj(level) if self.rng.random() < 0.6 else self.arr(level)
        else:
            s = self.leaf()
        return self.nullable(s) if level > 0 and self.rng.random() < 0.2 else s

    def nullable(self, s: dict) -> dict:
        if isinstance(s.get("type"), str) and s["type"] != "null" and self.rng.random() < 0.5:
            return {**s, "type": [s["type"], "null"]}
        return {"anyOf": [s, {"type": "null"}]}

    def obj(self, level: int) -> dict:
        rng = self.rng
        if rng.random() < 0.08:  # free entries: an object with no listed properties
            extra = rng.choice([True, {"type": "integer", "minimum": 0, "maximum": 99}, {"type": "boolean"}])
            return {"type": "object", "additionalProperties": extra}
        names = rng.sample(NAMES, rng.randint(1, 4))
        props = {n: self.node(level + 1) for n in names}
        s: dict = {"type": "object", "properties": props, "required": [n for n in names if rng.random() < 0.6]}
        if rng.random() < 0.7:
            s["additionalProperties"] = False
        return s

    def arr(self, level: int) -> dict:
        rng = self.rng
        s: dict = {"type": "array", "items": self.node(level + 1)}
        lo = rng.randint(0, 2)
        if rng.random() < 0.6:
            s["minItems"] = lo
        if rng.random() < 0.6:
            s["maxItems"] = lo + rng.randint(0, 2)
        return s

    def leaf(self) -> dict:
        rng = self.rng
        kind = rng.choices(["string", "number", "boolean", "null", "enum", "const"], [5, 4, 1, 0.5, 1.5, 1])[0]
        if kind == "string":
            return self.string()
        if kind == "number":
            return self.number()
        if kind == "enum":
            return {"enum": rng.sample(MIXED, rng.randint(1, 5))}
        if kind == "const":
            return {"const": rng.choice(MIXED + WORDS)}
        return {"type": kind}

    def string(self) -> dict:
        rng = self.rng
        s: dict = {"type": "string"}
        how = rng.choice(["plain", "bounded", "bounded", "enum", "const", "pattern", "pattern"])
        if how == "bounded":
            lo = rng.randint(0, 4)
            if rng.random() < 0.8:
                s["minLength"] = lo
            if rng.random() < 0.8:
                s["maxLength"] = lo + rng.randint(0, 8)
        elif how == "enum":
            s["enum"] = rng.sample(WORDS, rng.randint(1, 4))
        elif how == "const":
            s["const"] = rng.choice(WORDS)
        elif how == "pattern":
            s["pattern"] = rng.choice(PATTERNS)
        return s

    def number(self) -> dict:
        rng = self.rng
        kind = rng.choice(["integer", "number"])
        s: dict = {"type": kind}
        lo = rng.choice([None, rng.randint(-1000, 1000), rng.randint(-5, 5)])
        hi = rng.choice([None, (lo if lo is not None else 0) + rng.choice([0, 1, 2, 10, 100, 5000])])
        frac = 0.5 if kind == "number" and rng.random() < 0.3 else 0
        if lo is not None:
            if rng.random() < 0.4:
                s["exclusiveMinimum"] = lo - 1 + frac
            else:
                s["minimum"] = lo - frac
        if hi is not None:
            if rng.random() < 0.4:
                s["exclusiveMaximum"] = hi + 1 - frac
            else:
                s["maximum"] = hi + frac
        return s


def features(s, seen: set) -> set:
    """The keywords and node kinds a schema uses (for the summary)."""
    if isinstance(s, dict):
        seen.update(k for k in s if k not in ("properties",))
        if isinstance(s.get("type"), list):
            seen.add("type-with-null")
        for k, v in s.items():
            if k == "properties":
                for sub in v.values():
                    features(sub, seen)
            elif k in ("items", "additionalProperties", "anyOf"):
                for sub in v if isinstance(v, list) else [v]:
                    features(sub, seen)
    return seen


def depth_of(s) -> int:
    if not isinstance(s, dict):
        return 0
    subs = list(s.get("properties", {}).values()) + [s.get("items")] + list(s.get("anyOf", []))
    if isinstance(s.get("additionalProperties"), dict):
        subs.append(s["additionalProperties"])
    inner = max((depth_of(x) for x in subs if isinstance(x, dict)), default=0)
    own = 1 if s.get("type") in ("object", "array") or (isinstance(s.get("type"), list) and {"object", "array"} & set(s["type"])) else 0
    return own + inner


def model_and_tokenizer(args):
    dtype = getattr(torch, args.dtype)
    if args.canvas:
        cfg = dataclasses.replace(preset_config(args.preset), canvas_length=args.canvas)
        model = loading.build_model(cfg, device=torch.device(args.device), dtype=dtype, seed=args.model_seed,
                                    embed_std=1.0)
        source = f"preset {args.preset} (random weights), canvas {args.canvas}"
    else:
        model, source = build(BenchSpec(preset=args.preset, device=args.device, dtype=args.dtype,
                                        seed=args.model_seed))
    return model, byte_tokenizer(model.cfg.vocab_size), source


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--canvas", type=int, default=0, help="shorten the preset's canvas (0: the preset's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--schemas", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--rows", type=int, default=3, help="answers per schema and seed, in one batched call")
    ap.add_argument("--steps", type=int, default=2, help="max_denoising_steps per canvas")
    ap.add_argument("--depth", type=int, default=3, help="most nested containers")
    ap.add_argument("--schema-seed", type=int, default=0)
    ap.add_argument("--model-seed", type=int, default=0)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()

    model, tok, source = model_and_tokenizer(args)
    cfg = model.cfg
    engine = Engine(model, tok)
    rng = random.Random(args.schema_seed)
    gen = SchemaGen(rng, args.depth)
    prompts = ["".join(rng.choices(string.ascii_lowercase + " ", k=rng.randint(1, 12))) for _ in range(args.rows)]

    outputs = parsed = valid = stopped = multi = rejected = 0
    tokens, canvases, depths, failures, examples, seen = [], [], [], [], [], set()
    t0 = time.perf_counter()
    gen_s = 0.0
    for i in range(args.schemas):
        while True:  # a draft the subset rejects (say bounds that leave no integer) is drawn again
            schema = gen.schema()
            try:
                check_schema(schema)
                plan, _ = request_plan(schema, None, tok, cfg.canvas_length, engine.params())
                break
            except (SchemaError, ValueError):
                rejected += 1
        features(schema, seen)
        depths.append(depth_of(schema))
        tokens.append(plan.max_new_tokens)
        canvases.append(-(-plan.max_new_tokens // cfg.canvas_length))
        multi += plan.max_new_tokens > cfg.canvas_length
        validator = jsonschema.Draft202012Validator(schema)
        for seed in range(args.seeds):
            t1 = time.perf_counter()
            outs = engine.generate(prompts, json_schema=schema, seed=seed, max_denoising_steps=args.steps,
                                   confidence_threshold=0.0)
            gen_s += time.perf_counter() - t1
            for out in outs:
                outputs += 1
                stopped += out.finish_reason == "stop"
                error = None
                try:
                    value = json.loads(out.text)
                    parsed += 1
                    try:
                        validator.validate(value)
                        valid += 1
                    except jsonschema.ValidationError as e:
                        error = f"invalid: {e.message} at {list(e.absolute_path)}"
                except json.JSONDecodeError as e:
                    error = f"does not parse: {e}"
                if len(examples) < 5 and seed == 0 and out is outs[0]:
                    examples.append({"schema": schema, "text": out.text, "valid": error is None})
                if error and len(failures) < 5:
                    failures.append({"schema": schema, "seed": seed, "text": out.text, "error": error})
        if (i + 1) % 25 == 0:
            print(f"{i + 1}/{args.schemas} schemas, {outputs} outputs, {valid} valid, "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0

    rate = valid / max(1, outputs)
    layout = {"min": min(tokens), "median": statistics.median(tokens), "max": max(tokens),
              "mean": statistics.mean(tokens)}
    print(f"{source}: {args.schemas} schemas x {args.seeds} seeds x {args.rows} rows = {outputs} outputs; "
          f"parsed {parsed}, valid {valid} ({rate:.2%}), finish 'stop' {stopped}; "
          f"{multi}/{args.schemas} layouts span >1 canvas of {cfg.canvas_length} (canvases per layout "
          f"{min(canvases)}..{max(canvases)}, median {statistics.median(canvases)}); answer tokens per layout "
          f"min {layout['min']} median {layout['median']} max {layout['max']}; {rejected} drafts rejected; "
          f"wall {wall:.1f} s ({gen_s:.1f} s generating)")
    for f in failures:
        print(f"FAIL {f['error']}\n  schema {json.dumps(f['schema'])}\n  text {f['text']!r}")
    if args.json:
        out = {"command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "") + " python "
                          "benchmarks/structured_validity.py " + " ".join(sys.argv[1:]),
               "what": "random JSON Schemas within dgemma.structured's subset, answers from a random-weight model "
                       "through Engine.generate(json_schema=...), each checked with json.loads and jsonschema "
                       "(Draft 2020-12)",
               "model": source, "canvas_length": cfg.canvas_length, "vocab_size": cfg.vocab_size,
               "dtype": args.dtype, "device": args.device, "steps_per_canvas": args.steps,
               "prompts": prompts, "torch": torch.__version__, "python": platform.python_version(),
               "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
               "platform": platform.platform(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "schemas": args.schemas, "seeds": args.seeds, "rows": args.rows, "outputs": outputs,
               "parsed": parsed, "valid": valid, "valid_rate": rate, "finish_stop": stopped,
               "drafts_rejected": rejected, "multi_canvas_layouts": multi,
               "canvases_per_layout": {"min": min(canvases), "median": statistics.median(canvases),
                                       "max": max(canvases)},
               "tokens_per_layout": layout,
               "schema_depth": {str(d): depths.count(d) for d in sorted(set(depths))},
               "keywords_seen": sorted(seen), "wall_s": wall, "generate_s": gen_s, "failures": failures,
               "examples": examples}
        atomic_write_text(args.json, json.dumps(out, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
