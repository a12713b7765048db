"""A plain install (``pip install -e .``, no extras): the declared dependencies are enough to run, save and
load a model, and ``dgemma.load()`` with no source gives the embedded model.

The dependency check runs the commands in a subprocess that can import only the standard library, dgemma
and the distributions ``[project] dependencies`` pulls in (their requirements, transitively, without
extras); every other installed distribution is hidden, as in a fresh venv. ``.ci/no_extras.sh`` does the
same with a real venv.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import dgemma
from dgemma.embedded import default_model

ROOT = Path(__file__).resolve().parents[1]
PUZZLE = "300281450150030060280000003070012046043967502601058739000090000015000620000005970"

# Wraps every module finder so that the hidden top-level modules are not found, then runs the workflow.
_CHILD = """
import json, sys
hidden = set(json.loads(sys.argv[1]))
class Hide:
    def __init__(self, inner):
        self.inner = inner
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in hidden:
            return None
        return self.inner.find_spec(name, path, target)
    def __getattr__(self, attr):
        return getattr(self.inner, attr)
sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
import dgemma
engine = dgemma.load()
kw = dict(max_new_tokens=82, seed=0)
text = engine.generate(sys.argv[2], **kw).text
engine.save_pretrained(sys.argv[3])
assert dgemma.load(sys.argv[3]).generate(sys.argv[2], **kw).text == text
print("ok")
"""


def _runtime_closure() -> set[str]:
    """Distributions a plain install brings: the declared dependencies and their own, without extras."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    todo, seen = [Requirement(r) for r in declared], set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        todo += [Requirement(r) for r in md.requires(req.name) or []]
    return seen


def _hidden_modules(allowed: set[str]) -> list[str]:
    """Top-level modules that belong only to installed distributions outside ``allowed``."""
    return sorted(mod for mod, dists in md.packages_distributions().items()
                  if mod not in sys.stdlib_module_names and mod != "dgemma"
                  and not {canonicalize_name(d) for d in dists} & allowed)


def test_declared_dependencies_suffice_to_generate_save_and_load(tmp_path):
    hidden = _hidden_modules(_runtime_closure())
    assert "numpy" not in hidden  # declared: safetensors writes through it, torch warns at import without it
    assert "transformers" in hidden  # the check hides something real: an extra, not a plain dependency
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(hidden), PUZZLE, str(tmp_path / "saved")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr
    assert "NumPy" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr


def test_load_with_no_source_is_the_embedded_model():
    engine = dgemma.load()
    named = dgemma.load(default_model())
    assert engine.config == named.config
    kw = dict(max_new_tokens=82, seed=0)
    answer = engine.generate(PUZZLE, **kw).text
    assert answer == named.generate(PUZZLE, **kw).text
    digits = answer.replace(" ", "")
    assert len(digits) >= 81 and all(p in "0" + a for p, a in zip(PUZZLE, digits))  # the clues are kept
