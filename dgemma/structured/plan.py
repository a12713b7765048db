"""A compiled schema (:class:`Plan`) and the canvas constraint that writes it (:class:`SchemaConstraint`).

``compile_schema`` lays the answer out (``layout.py``) and turns the distinct allowed sets into the rows of
one bool table ``[S, V]`` shared by every request of the plan. ``plan.constraint()`` is a fresh, stateful
constraint for one request:

* ``start(k)`` gives canvas ``k`` its rule: fixed structure tokens, and per value position the row of its
  set; what earlier canvases decided (a string closed, an enum chosen, an optional item left out) is fixed
  there, as whitespace or the chosen tokens;
* ``finish(k, tokens)`` reads the kept tokens left to right and writes the output: a string is cut at the
  first quote, an integer at the first whitespace (or after a leading 0), an enum is the alternative its
  first token selects, a left-out region is whitespace (or ``null``); the rest of a cut value is whitespace.

Every combination of tokens the sets allow gives, after ``finish``, a JSON text that validates: that is the
guarantee, and the tests check it with random weights over generated schemas.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dgemma.constraints import CanvasConstraint, CanvasRule
from dgemma.structured.layout import FIXED, PAD, SLOT, Builder, Limits, Position
from dgemma.structured.schema import SchemaError, check_schema, from_response_format
from dgemma.structured.vocab import Vocabulary

OFF, ON = "off", "on"


@dataclass
class Plan:
    """A schema laid out for one tokenizer and canvas length."""

    builder: Builder
    canvas_length: int
    eos_token_id: int | None
    keys: list  # the distinct allowed sets, in table row order
    table: torch.Tensor  # [S, V_tokenizer] bool
    set_of: list[int]  # per position, its row in ``table`` (-1: fixed)
    _tables: dict = field(default_factory=dict, repr=False)  # the table padded to a model's vocabulary

    @property
    def max_new_tokens(self) -> int:
        """Answer tokens the layout needs (JSON, prefix, suffix and EOS)."""
        return len(self.builder.positions)

    def constraint(self) -> "SchemaConstraint":
        """A fresh constraint for one request (it keeps what each canvas decided)."""
        return SchemaConstraint(self)

    def table_for(self, vocab: int) -> torch.Tensor:
        """``[S, vocab]`` bool: the table cut or padded (never allowed) to a model's vocabulary."""
        if vocab not in self._tables:
            s, width = self.table.shape
            if vocab < width:
                if bool(self.table[:, vocab:].any()):
                    raise ValueError(f"the schema's tokens go beyond the model's vocabulary of {vocab}")
                t = self.table[:, :vocab].clone()
            else:
                t = torch.cat([self.table, torch.zeros(s, vocab - width, dtype=torch.bool)], 1)  # [S, vocab]
            self._tables[vocab] = t
        return self._tables[vocab]

    def layout(self) -> list[str]:
        """One line per answer position (debugging): its kind and its token's text or its set."""
        texts = self.builder.v.texts
        out = []
        for p, pos in enumerate(self.builder.positions):
            what = repr(texts[pos.token]) if pos.token >= 0 and texts[pos.token] is not None else str(pos.token)
            if pos.kind != FIXED and pos.key is not None:
                ids, cls = pos.key
                what += f" set={sorted(texts[t] or t for t in ids)[:8]}{' + ' + str(cls[0]) if cls else ''}"
            out.append(f"{p:4d} {pos.kind:6s} {what} regions={list(pos.regions)}")
        return out


def compile_schema(schema: dict | None, tokenizer, canvas_length: int, *, eos_token_id: int | None = None,
                   prefix: str = "", suffix: str = "", limits: Limits | None = None) -> Plan:
    """Lay out ``schema`` (None: any JSON object) between ``prefix`` and ``suffix`` for ``tokenizer`` (a
    ``dgemma.tokenizer.Tokenizer`` or a :class:`Vocabulary`), then EOS when ``eos_token_id`` is given.
    Raises SchemaError for what the subset does not cover, ValueError for what the tokenizer cannot write."""
    if not isinstance(canvas_length, int) or canvas_length < 1:
        raise ValueError("canvas_length must be a positive integer")
    if not isinstance(prefix, str) or not isinstance(suffix, str):
        raise ValueError("prefix and suffix must be strings")
    node = check_schema({"type": "object"} if schema is None else schema)
    vocab = Vocabulary.of(tokenizer)
    b = Builder(vocab, limits or Limits())
    b.text(prefix)
    b.node(node)
    b.text(suffix)
    b.flush()
    if eos_token_id is not None:
        b.add(Position(FIXED, int(eos_token_id)))
    keys: list = []
    index: dict = {}
    set_of = []
    for pos in b.positions:
        if pos.kind == FIXED:
            set_of.append(-1)
            continue
        if pos.key not in index:
            index[pos.key] = len(keys)
            keys.append(pos.key)
        set_of.append(index[pos.key])
    rows = [_row(vocab, key) for key in keys]
    table = torch.stack(rows) if rows else torch.zeros(0, vocab.size, dtype=torch.bool)  # [S, V]
    if bool((~table.any(1)).any()):
        raise ValueError("the tokenizer has no token for a value the schema needs")
    return Plan(b, canvas_length, eos_token_id, keys, table, set_of)


def _row(vocab: Vocabulary, key) -> torch.Tensor:
    ids, cls = key
    ids = set(ids)
    if cls is not None:
        if cls[0] == "str":
            most = cls[1]
            ids |= {t for t in vocab.string_ids if most is None or len(vocab.texts[t]) <= most}
        else:  # a pattern's character class: one-character tokens of its characters
            chars = [t for ch, t in vocab.char_of.items() if ch in cls[1]]
            if not chars:
                raise SchemaError("`pattern` has a character class that no single token writes (or that needs an "
                                  "escape in JSON)", "pattern")
            ids |= set(chars)
    return vocab.mask(sorted(ids), vocab.size)


class SchemaConstraint(CanvasConstraint):
    """The rules of one request's answer under a :class:`Plan` (stateful: one object per request)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        b = plan.builder
        self.region = [None] * len(b.regions)  # None (undecided), ON or OFF
        self.closed = [False] * len(b.slots)  # string / integer slots: ended
        self.choice: list[int | None] = [None] * len(b.slots)  # enum slots: the alternative
        self.vocab = plan.table.shape[1]

    def __deepcopy__(self, memo) -> "SchemaConstraint":
        """A copy with its own state that shares the plan (its table is read-only)."""
        new = SchemaConstraint(self.plan)
        new.region, new.closed, new.choice = list(self.region), list(self.closed), list(self.choice)
        new.vocab = self.vocab
        return new

    def validate(self, length: int, vocab: int) -> None:
        if length != self.plan.canvas_length:
            raise ValueError(f"the schema was compiled for canvases of {self.plan.canvas_length}, not {length}")
        self.plan.table_for(vocab)
        self.vocab = vocab

    # ------------------------------------------------------------------ rules
    def _outside(self, p: int) -> tuple[str, int]:
        """``("off", token)`` if a left-out region covers ``p``, ``("open", -1)`` if one is undecided, else
        ``("on", -1)``."""
        b = self.plan.builder
        for r in b.positions[p].regions:
            state = self.region[r]
            if state == OFF:
                return OFF, self._off_token(r, p)
            if state is None:
                return "open", -1
        return ON, -1

    def _off_token(self, r: int, p: int) -> int:
        reg = self.plan.builder.regions[r]
        o = p - reg.start
        return reg.off_tokens[o] if o < len(reg.off_tokens) else self.plan.builder.v.ws

    def start(self, canvas: int, attempt: int) -> CanvasRule:
        b, c = self.plan.builder, self.plan.canvas_length
        n, ws = len(b.positions), b.v.ws
        fixed = torch.full((c,), -1, dtype=torch.long)  # [C]
        sets = torch.full((c,), -1, dtype=torch.long)  # [C] rows of the plan's table
        for i in range(c):
            p = canvas * c + i
            if p >= n:
                if self.plan.eos_token_id is None:
                    fixed[i] = ws
                continue
            pos = b.positions[p]
            state, tok = self._outside(p)
            if state == ON:
                tok = self._known(pos)
            if tok >= 0:
                fixed[i] = tok
            elif pos.kind != FIXED:
                sets[i] = self.plan.set_of[p]
            else:
                fixed[i] = pos.token
        used = sorted({int(s) for s in sets.tolist() if s >= 0})
        if not used:
            return CanvasRule(fixed=fixed)
        remap = torch.full((len(self.plan.keys),), -1, dtype=torch.long)
        remap[torch.tensor(used)] = torch.arange(len(used))
        rows = self.plan.table_for(self.vocab)[torch.tensor(used)]  # [S_k, V]: only this canvas's sets
        return CanvasRule(fixed=fixed, set_index=torch.where(sets >= 0, remap[sets.clamp(min=0)], -1), table=rows)

    def _known(self, pos) -> int:
        """The token of a position whose regions are all kept, when nothing is left to choose (else -1)."""
        if pos.kind == SLOT:
            slot = self.plan.builder.slots[pos.slot]
            if slot.kind == "enum" and self.choice[pos.slot] is not None:
                alt = slot.alts[self.choice[pos.slot]]
                return alt[pos.offset] if pos.offset < len(alt) else self.plan.builder.v.ws
            if self.closed[pos.slot]:
                return self.plan.builder.v.ws
            return pos.token  # a one-token set inside a region (else -1)
        if pos.kind == PAD:
            return self.plan.builder.v.ws
        return pos.token

    # ------------------------------------------------------------------ output
    def finish(self, canvas: int, tokens: torch.Tensor) -> torch.Tensor:
        b, c = self.plan.builder, self.plan.canvas_length
        n, ws = len(b.positions), b.v.ws
        out = tokens.clone()
        drawn = tokens.tolist()
        for i in range(c):
            p = canvas * c + i
            if p >= n:
                if self.plan.eos_token_id is None:
                    out[i] = ws
                continue
            out[i] = self._write(p, drawn[i])
        return out

    def _write(self, p: int, drawn: int) -> int:
        b = self.plan.builder
        pos = b.positions[p]
        for r in pos.regions:
            state = self.region[r]
            if state == OFF:
                return self._off_token(r, p)
            if state is None:  # the region's first position decides it
                reg = b.regions[r]
                assert p == reg.start, "a region is decided at its first position"
                if drawn == reg.off:
                    for q in [r, *reg.followers]:
                        self.region[q] = OFF
                    return self._off_token(r, p)
                self.region[r] = ON
        if pos.kind == SLOT:
            return self._slot(pos, pos.token if pos.token >= 0 else drawn)
        if pos.kind == PAD:
            return b.v.ws
        return pos.token

    def _slot(self, pos, drawn: int) -> int:
        b = self.plan.builder
        slot, s, o = b.slots[pos.slot], pos.slot, pos.offset
        ws = b.v.ws
        if slot.kind == "enum":
            if o == 0:
                self.choice[s] = slot.selectors.index(drawn) if drawn in slot.selectors else 0
            alt = slot.alts[self.choice[s]]
            return alt[o] if o < len(alt) else ws
        if self.closed[s]:
            return ws
        if slot.kind == "string":
            if o == slot.length - 1 or drawn == b.v.quote:
                self.closed[s] = True
                return b.v.quote
            return drawn
        if slot.signed and o == 0:  # the sign position: minus or whitespace
            return drawn
        if drawn == ws:
            self.closed[s] = True
        elif o == int(slot.signed) and slot.zero_cut and drawn == b.v.digits[0]:
            self.closed[s] = True
        return drawn


def request_plan(json_schema, response_format, tokenizer, canvas_length: int, params):
    """``(plan or None, params)`` of a call's ``json_schema`` or OpenAI ``response_format`` (at most one):
    the compiled layout, and ``params.max_new_tokens`` raised to what it needs. ValueError for a bad one."""
    if response_format is not None:
        if json_schema is not None:
            raise ValueError("give json_schema or response_format, not both")
        wanted, json_schema = from_response_format(response_format)
        if not wanted:
            return None, params
        json_schema = {"type": "object"} if json_schema is None else json_schema
    if json_schema is None:
        return None, params
    if tokenizer is None:
        raise ValueError("this model has no tokenizer, so it cannot write JSON output")
    eos = params.eos_token_id
    plan = compile_schema(json_schema, tokenizer, canvas_length, eos_token_id=eos[0] if eos else None)
    if params.max_new_tokens < plan.max_new_tokens:
        params = params.replace(max_new_tokens=plan.max_new_tokens)
    return plan, params
