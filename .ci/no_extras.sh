#!/usr/bin/env bash
# A plain install, as the README's first command does it: a fresh venv (no system site-packages), the
# pinned CPU torch, then the package without extras; then every command that needs no extras, run from
# outside the source tree. Fails (non-zero) on any error, traceback or NumPy warning. Measured on 2 AMD
# EPYC cores alone: 28 s to install, 116 s in all (shared with other jobs, load average 5-7: 73 s and 357 s); pip keeps downloaded
# wheels in its cache, so a repeated run installs without downloading.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1  # threads: the commands' own defaults (or the caller's settings)
PUZZLE=300281450150030060280000003070012046043967502601058739000090000015000620000005970

# The venv gets no pip of its own: this pip installs into it (--python). --no-compile: no bytecode for the
# thousands of torch modules up front (Python compiles what is imported).
SECONDS=0
python -m venv --without-pip "$WORK/venv"
PY="$WORK/venv/bin/python"
DGEMMA="$WORK/venv/bin/dgemma"
python -m pip --python "$PY" install -q --no-compile torch==2.13.0
python -m pip --python "$PY" install -q --no-compile "$ROOT"
echo "no-extras: installed in ${SECONDS} s" >&2
cd "$WORK"

# Each command's output is kept (and shown if it fails); a traceback or torch's "Failed to initialize
# NumPy" on stderr fails the step too.
step() {
  local name="$1"; shift
  echo "no-extras: $name" >&2
  if ! "$@" >"$WORK/stdout" 2>"$WORK/stderr"; then
    cat "$WORK/stdout" "$WORK/stderr" >&2; echo "no-extras: $name FAILED" >&2; exit 1
  fi
  if grep -qE "Traceback|NumPy" "$WORK/stderr"; then
    cat "$WORK/stderr" >&2; echo "no-extras: $name wrote a traceback or NumPy warning" >&2; exit 1
  fi
}

step "sudoku solve" bash -c "echo $PUZZLE | '$DGEMMA' sudoku solve > solved.txt"
"$PY" - "$PUZZLE" <<'EOF'
import sys
puzzle, answer = sys.argv[1], open("solved.txt").read().strip()
assert len(answer) == 81 and answer.isdigit(), answer
assert all(p in "0" + a for p, a in zip(puzzle, answer)), "the answer changed a clue"
EOF
step "info" "$DGEMMA" info
step "generate" bash -c "'$DGEMMA' generate $PUZZLE --max-new-tokens 82 --seed 0 > generated.txt"
test -s generated.txt
step "save_pretrained" env OMP_NUM_THREADS=1 "$PY" -c "
import dgemma
engine = dgemma.load()
engine.save_pretrained('saved')
again = dgemma.load('saved')
kw = dict(max_new_tokens=82, seed=0)
assert again.generate('$PUZZLE', **kw).text == engine.generate('$PUZZLE', **kw).text
"

# A few steps of training from scratch (preset tiny, the embedded model's digit tokenizer) with a checkpoint.
"$PY" - <<'EOF'
import json, random
from dgemma.embedded import default_model
r = random.Random(0)
with open("train.jsonl", "w") as f:
    for _ in range(64):
        s = "".join(r.choice("123456789") for _ in range(r.randint(3, 7)))
        f.write(json.dumps({"prompt": s, "completion": s[::-1]}) + "\n")
open("tiny.toml", "w").write(f"""
[model]
preset = "tiny"
tokenizer = "{default_model()}"

[data]
train = "train.jsonl"
max_length = 64
template = "raw"

[train]
out = "run"
steps = 4
batch_size = 4
micro_batch = 4
warmup = 1
save_every = 2
precision = "fp32"
""")
EOF
step "train" "$DGEMMA" train tiny.toml --no-progress
test -d run/checkpoints/step-00000002 && test -f run/final/model.safetensors
step "generate (trained)" "$DGEMMA" generate 123 --model run/final --max-new-tokens 16 --seed 0
echo "no-extras: all commands ran on a plain install (${SECONDS} s)" >&2
