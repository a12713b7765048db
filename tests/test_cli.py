"""The command line as a user drives it: subprocesses on a tiny checkpoint, the live view on a pseudo-terminal."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import dgemma
from dgemma.engine import CanvasUpdate, StepUpdate
from dgemma.view.state import CanvasState

ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
ARGS = ["--max-new-tokens", "24", "--max-denoising-steps", "5", "--seed", "3", "--confidence-threshold", "0"]


def _env(**extra) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def _cli(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dgemma", *args], input=stdin, capture_output=True, text=True,
                          env=_env(), cwd=ROOT, timeout=300)


def _on_pty(*args) -> str:
    """Run the CLI on a pseudo-terminal (through the project's asciicast recorder, which is checked on the
    way); everything it drew, decoded."""
    import importlib.util
    import tempfile

    spec = importlib.util.spec_from_file_location("record", ROOT / "docs" / "demo" / "record.py")
    record = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(record)
    with tempfile.TemporaryDirectory() as tmp:
        cast = Path(tmp) / "run.cast"
        env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        assert record.record([sys.executable, "-m", "dgemma", *args], str(cast), 100, 40, env) == 0
        header, *frames = [json.loads(line) for line in cast.read_text().splitlines()]
    assert header["version"] == 2 and header["width"] == 100
    assert all(kind == "o" for _, kind, _ in frames) and [t for t, _, _ in frames] == sorted(t for t, _, _ in frames)
    return "".join(data for _, _, data in frames)


@pytest.fixture(scope="module")
def model(ckpt_factory):
    return str(ckpt_factory("tiny"))


@pytest.fixture(scope="module")
def expected(model):
    engine = dgemma.load(model)
    return engine.generate("hello", max_new_tokens=24, max_denoising_steps=5, seed=3, confidence_threshold=0.0)


def test_piped_output_is_the_plain_final_text(model, expected):
    proc = _cli("generate", "hello", "--model", model, *ARGS)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected.text + "\n" and "\x1b" not in proc.stdout
    # stdin works as the prompt too, and --plain gives the same text
    again = _cli("generate", "--model", model, "--plain", *ARGS, stdin="hello")
    assert again.stdout == proc.stdout and "reading the prompt" not in again.stderr  # piped: no hint


def test_generate_says_it_reads_the_prompt_from_a_terminal(model, expected):
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "dgemma", "generate", "--model", model, *ARGS], stdin=slave,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    os.close(slave)
    os.write(master, b"hello\n\x04")  # the prompt, then Ctrl-D at the start of a line: end of input
    out, err = proc.communicate(timeout=300)
    os.close(master)
    assert proc.returncode == 0, err
    assert err.splitlines()[0] == "dgemma: reading the prompt from stdin (end with Ctrl-D)"
    assert out == expected.text + "\n"


@pytest.mark.parametrize("render", ["text", "markdown"])
def test_live_view_redraws_the_canvas_at_every_step(model, expected, render):
    out = _on_pty("generate", "hello", "--model", model, "--render", render, *ARGS)
    plain = ANSI.sub("", out)
    # one frame per step: the status line of every step of both canvases (24 tokens > canvas 16)
    for canvas in (1, 2):
        for step in range(1, 6):
            assert f"canvas {canvas}  step {step}/5" in plain
    assert out.count("\x1b[1A") >= 10  # the live area moves the cursor up to redraw in place
    assert "\x1b[2m" in out  # noise positions (and the status line) are dimmed
    if render == "text":  # the final text is printed last (Markdown re-renders it)
        assert plain.rstrip().endswith(expected.text.rstrip()[-10:])


def test_json_reports_text_ids_steps_and_timings(model, expected):
    proc = _cli("generate", "hello", "--model", model, "--json", *ARGS)
    out = json.loads(proc.stdout)
    assert out["text"] == expected.text and out["token_ids"] == expected.token_ids
    assert out["steps"] == [5, 5] and out["finish_reason"] == expected.finish_reason
    t = out["timings"]
    assert len(t["canvas_s"]) == 2 and 0 < t["first_canvas_s"] <= t["canvas_s"][1] <= t["seconds"]


def test_json_schema_answers_validate_and_a_bad_schema_is_one_line(model, tmp_path, capsys):
    """In-process (``dgemma.cli.main``), as the other commands' outputs are checked above through a subprocess."""
    from dgemma.cli import main

    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "ok": {"type": "boolean"}}, "required": ["n"]}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    (tmp_path / "any.json").write_text("{}")
    (tmp_path / "bad.json").write_text('{"type": "string", "format": "email"}')
    for name, seed in (("s.json", "1"), ("s.json", "2"), ("any.json", "3")):
        assert main(["generate", "hello", "--model", model, "--json-schema", str(tmp_path / name), *ARGS,
                     "--seed", seed]) == 0
        out = json.loads(capsys.readouterr().out)
        jsonschema.validate(out, schema if name == "s.json" else {"type": "object"})
    for name, message in (("bad.json", "format"), ("missing.json", "No such file")):
        with pytest.raises(SystemExit) as stop:
            main(["generate", "hello", "--model", model, "--json-schema", str(tmp_path / name), *ARGS])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_chat_answers_each_piped_line_with_the_cached_history(model):
    proc = _cli("chat", "--model", model, *ARGS, stdin="Hello there\n\n/reset\nHello there\nAnd then?\n")
    assert proc.returncode == 0, proc.stderr
    engine = dgemma.load(model)
    session = engine.chat_session()
    kw = {"max_new_tokens": 24, "max_denoising_steps": 5, "seed": 3, "confidence_threshold": 0.0}
    first = session.send("Hello there", **kw).answer
    second = session.send("And then?", **kw).answer
    # three answers: turn 1, turn 1 again after /reset (same answer), then turn 2 on the kept history
    assert proc.stdout == f"{first}\n{first}\n{second}\n"
    # a turn that cannot run (longer than the context) is reported on one line and the chat goes on
    long = "x " * 6000
    proc = _cli("chat", "--model", model, *ARGS, stdin=f"Hello there\n{long}\nAnd then?\n")
    assert proc.returncode == 1 and proc.stdout == f"{first}\n{second}\n"
    assert "dgemma: " in proc.stderr and "context" in proc.stderr and "Traceback" not in proc.stderr


def test_chat_refuses_a_model_without_a_chat_template_at_startup():
    proc = _cli("chat", stdin="12\n34\n")  # the embedded Sudoku model has no chat template
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["dgemma: the embedded model has no chat template, so it cannot chat; "
                                        "`dgemma generate` completes plain prompts"]


def _touched_by_one_token(net) -> int:
    """Parameters one canvas token reads in a self-conditioned decoder pass, counted on the real tensors:
    a tensor counts whole if it gets a gradient, an expert tensor ``[E, ...]`` only in the slices of the
    experts the token was routed to (the prompt's K/V are encoded without gradients)."""
    import torch

    from dgemma.cache import KVCache

    cfg = net.cfg
    g = torch.Generator().manual_seed(0)
    cache = KVCache(cfg, 1, 8)
    with torch.no_grad():
        net.encode(torch.randint(3, cfg.vocab_size, (1, 5), generator=g), cache)
    net.zero_grad()
    sc = torch.randn(1, 1, cfg.vocab_size, generator=g)
    logits = net.decode(torch.randint(3, cfg.vocab_size, (1, 1), generator=g), cache, sc)  # [1, 1, V]
    (logits * torch.randn(logits.shape, generator=g)).sum().backward()
    touched = 0
    for name, p in net.named_parameters():
        assert p.grad is not None and bool(p.grad.ne(0).any()), f"{name} is not read"
        if ".experts." in name:
            hit = p.grad.flatten(1).ne(0).any(1)  # [E]: experts whose slice got a gradient
            assert int(hit.sum()) == cfg.top_k_experts, name
            touched += int(hit.sum()) * p[0].numel()
        else:
            touched += p.numel()
    net.zero_grad(set_to_none=True)
    return touched


def test_info_matches_the_loaded_model(model):
    proc = _cli("info", model, "--json")
    info = json.loads(proc.stdout)
    net = dgemma.load(model).model
    total = sum(p.numel() for p in net.parameters())
    assert info["parameters"]["total"] == total
    cfg = net.cfg
    assert info["parameters"]["active_per_token"] == _touched_by_one_token(net)
    stored = sum(t.numel() for t in net.state_dict().values())  # the parameters and each layer's two scalars
    assert info["bytes"]["bfloat16"] == 2 * stored and info["architecture"]["canvas_length"] == cfg.canvas_length
    text = _cli("info", model).stdout
    assert "parameters" in text and "defaults" in text


@pytest.mark.parametrize("args, message", [
    (["generate", "hi", "--model", "/no/such/dir"], "no checkpoint directory"),
    (["generate", "hi", "--max-new-tokens", "100000"], "context"),
    (["generate", "hi", "--max-new-tokens", "many"], "invalid int value"),
    (["generate", "hi", "--think"], "--think needs --chat"),
    (["info", "/no/such/dir"], "no checkpoint directory"),
    (["generate", "hi", "--device", "foo"], "not a torch device"),
    (["generate", "hi", "--dtype", "int8"], "floating-point"),
    (["generate"], "prompt is empty"),
    (["generate", "hi", "--threads", "0"], "--threads must be a positive integer"),
    (["sudoku", "solve", "1" * 81, "--threads", "-1"], "--threads must be a positive integer"),
])
def test_user_mistakes_give_one_line_and_a_nonzero_exit(model, args, message):
    if "--model" not in args and args[0] == "generate":
        args = [*args, "--model", model]
    proc = _cli(*args, stdin="\n")
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def _event_stream():
    yield StepUpdate(0, 1, [5, 6, 7, 1], 2, 0.9, [True, False, True, False])
    yield StepUpdate(0, 2, [5, 8, 7, 1], 4, 0.1, [True, True, True, True])
    yield CanvasUpdate(0, [5, 8, 7], "a<b", True)


def test_canvas_state_marks_settled_fresh_and_stops_at_eos():
    clock = iter([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).__next__
    state = CanvasState(max_steps=2, eos_ids=frozenset({1}), clock=clock)
    events = _event_stream()
    assert "settled -  mean entropy -  - tok/s" in state.status()  # nothing known yet: no 0/0, no 0.0 tok/s
    state.update(next(events))
    assert state.fresh == [True, False, True, False] and state.settled == [True, False, True, False]
    assert "step 1/2  settled 2/4  mean entropy 0.900  - tok/s" in state.status()  # counts from the first step
    state.update(next(events))
    assert state.fresh == [False, True, False, True]  # only what settled this step
    assert [t for t, _, _ in state.visible_draft()] == [5, 8, 7]  # a settled EOS ends the visible draft
    state.update(next(events))
    assert state.committed == [5, 8, 7] and state.steps_per_canvas == [2] and state.draft == []
    # the next canvas starts unknown again; the rate is known from the first commit (3 tokens in 4 clock s)
    assert "canvas 2  step 0/2  settled -  mean entropy -  0.8 tok/s" in state.status()



def test_canvas_state_starts_a_restarted_attempt_afresh():
    state = CanvasState(max_steps=2)
    state.update(StepUpdate(0, 2, [5, 6], 2, 0.1, [True, True]))
    state.update(StepUpdate(0, 3, [5, 9], 1, 0.9, [True, False], attempt=1))  # a restart from fresh noise
    assert state.fresh == [True, False]  # nothing carried over from the previous attempt
    assert "attempt 2  step 3" in state.status()
    state.update(CanvasUpdate(0, [5, 6], "", False))
    assert state.attempt == 0 and state.steps_per_canvas == [3]


def test_canvas_state_follows_one_attempt_of_a_pass_with_parallel_attempts():
    state = CanvasState(max_steps=4)
    state.update(StepUpdate(0, 1, [5, 6], 1, 0.5, [True, False], attempt=0))
    state.update(StepUpdate(0, 1, [7, 7], 2, 0.1, [True, True], attempt=1))  # the other row of the same pass
    assert (state.draft, state.attempt) == ([5, 6], 0)
    state.update(StepUpdate(0, 2, [5, 8], 2, 0.2, [True, True], attempt=0))
    assert state.fresh == [False, True] and state.draft == [5, 8]
    state.update(StepUpdate(0, 3, [1, 2], 1, 0.9, [True, False], attempt=2))  # its lane's next attempt
    assert (state.draft, state.attempt, state.fresh) == ([1, 2], 2, [True, False])


def test_notebook_view_updates_one_display_per_event(monkeypatch):
    from dgemma.view import notebook

    shown = []

    class Handle:
        def update(self, obj):
            shown.append(obj.data)

    fake = types.ModuleType("IPython.display")
    fake.HTML = lambda text: types.SimpleNamespace(data=text)
    fake.display = lambda obj, display_id=False: (shown.append(obj.data), Handle())[1]
    monkeypatch.setitem(sys.modules, "IPython", types.ModuleType("IPython"))
    monkeypatch.setitem(sys.modules, "IPython.display", fake)

    class FakeEngine:
        def params(self, **kw):
            return types.SimpleNamespace(max_denoising_steps=2, eos_token_id=(1,))

        def decode(self, ids, skip_special_tokens=True):
            return {5: "x", 6: "<", 7: "y", 8: "&", 1: ""}[ids[0]]

        def stream(self, prompt, params):
            return _event_stream()

    assert notebook.show(FakeEngine(), "p") is None  # the fake stream carries no Completion
    assert len(shown) == 4  # the first display, then one update per event
    assert "opacity" in shown[1] and "&lt;" in shown[1]  # noise dimmed, text escaped
    assert "a&lt;b" in shown[3] and "done" not in shown[2]
