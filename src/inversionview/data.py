"""Where training and evaluation inputs come from: a built-in task, or the user's own data.

The trainer needs only two things of a data source::

    source.sample(rng, split)  -> str        # one input, from the "train" or the held-out "test" side
    source.positions(text)     -> list[int]  # the token positions (BOS = 0) that may be queried in it

A built-in :class:`~inversionview.tasks.Task` already fits. :class:`FileSource` reads inputs from a text
file (one per line), a JSONL file (one object per line with a text field) or a Hugging Face dataset saved
with ``save_to_disk``; its held-out side is a fixed hash split of the inputs, like a task's. Query
positions follow a :class:`PositionRule`:

* ``"all"``: every non-special position (BOS and EOS excluded); the default for user data;
* ``[3, -2]``: fixed token indices, BOS = 0, negative counting back from the last text token (EOS
  excluded), as ``--position`` does; an index outside a shorter input is skipped for that input;
* ``{ marker = "|", offset = 1 }``: the token ``offset`` places after each occurrence of the marker token
  (0: the marker itself, -1: the token before it; ``offset`` may be a list). A token matches the marker
  if it equals it, leading and trailing spaces ignored (so GPT-2's ``" |"`` matches ``"|"``);
* ``{ span = "subject", offset = 0 }``: the last token of a span of the text that each record names in a
  field (JSONL or HF data): ``{"text": "The Eiffel Tower is in the city of", "subject": "Eiffel Tower"}``
  gives the position of ``" Tower"`` (its first occurrence in the text; ``offset`` as for a marker);
* a list mixing these, e.g. ``[-1, { span = "subject" }]``: the union of its rules' positions, each rule
  having to find at least one (a list of ints alone is the fixed rule).

When a source opens, its first :data:`CHECKED` inputs (in file order) are encoded and given to the rule:
an input that does not fit the model's context or vocabulary, a marker that never occurs in them, or an
input for which the rule gives no position is a one-line :class:`UserError` naming the file and line.
Inputs after those are checked when they are drawn, with the same one-line errors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    from .probed import ProbedModel

log = logging.getLogger(__name__)

CHECKED = 1000
"""Inputs of a data file checked when it is opened (all of them if it has fewer)."""
FORMATS = ("text", "jsonl", "hf")
TEST_FRACTION = 0.1
POSITIONS_HELP = (
    '"all", a list of token indices like [3, -2], a table like { marker = "|", offset = 1 } or '
    '{ span = "subject" }, or a list mixing indices and tables'
)


def is_test(text: str, fraction: float = TEST_FRACTION) -> bool:
    """The fixed train/test split of an input: a hash of its text (the same as a task's)."""
    return hashlib.sha1(text.encode()).digest()[0] < 256 * fraction


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


# ---------------------------------------------------------------------------------------------- positions
class PositionRule:
    """Which token positions of an input may be queried. See the module docstring for the three kinds."""

    def __init__(
        self,
        kind: str,
        indices: tuple[int, ...] = (),
        marker: str = "",
        offsets: tuple[int, ...] = (),
        span: str = "",
        parts: tuple["PositionRule", ...] = (),
    ):
        self.kind, self.indices, self.marker, self.offsets = kind, indices, marker, offsets
        self.span, self.parts = span, parts  # span: the record field naming a text span; parts: a union's rules

    @classmethod
    def parse(cls, value, where: str = "data.positions") -> "PositionRule | None":
        """A rule from its config value; None for None (the source's default)."""

        def ints(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if value is None:
            return None
        if value == "all":
            return cls("all")
        if ints(value):
            value = [value]
        if isinstance(value, (list, tuple)) and value and all(ints(v) for v in value):
            return cls("fixed", indices=tuple(value))
        if isinstance(value, (list, tuple)) and value and all(ints(v) or isinstance(v, dict) for v in value):
            fixed = [v for v in value if ints(v)]
            parts = [cls("fixed", indices=tuple(fixed))] if fixed else []
            for v in value:
                if isinstance(v, dict):
                    part = cls.parse(v, where)
                    assert part is not None  # a table is a rule, never the default
                    parts.append(part)
            return parts[0] if len(parts) == 1 else cls("union", parts=tuple(parts))
        if isinstance(value, dict):
            kind = "span" if "span" in value else "marker"
            unknown = set(value) - {kind, "offset"}
            if unknown:
                raise UserError(f"unknown key {sorted(unknown)[0]!r} in {where}: expected {kind} and offset")
            name, offset = value.get(kind), value.get("offset", 0)
            if not isinstance(name, str) or not name:
                example = '{ marker = "|", offset = 1 }' if kind == "marker" else '{ span = "subject" }'
                what = "a marker token" if kind == "marker" else "the name of a record field holding the span"
                raise UserError(f"{where} needs {what}, e.g. {example}, got {name!r}")
            offsets = [offset] if ints(offset) else offset
            if not (isinstance(offsets, (list, tuple)) and offsets and all(ints(o) for o in offsets)):
                raise UserError(f"{where}.offset must be an int or a list of ints, got {offset!r}")
            if kind == "span":
                return cls("span", span=name, offsets=tuple(offsets))
            return cls("marker", marker=name, offsets=tuple(offsets))
        raise UserError(f"{where} must be {POSITIONS_HELP}, got {value!r}")

    def to_spec(self):
        """The config value of this rule (what run.json records)."""
        if self.kind == "all":
            return "all"
        if self.kind == "fixed":
            return list(self.indices)
        if self.kind == "union":
            out = []
            for p in self.parts:
                out += p.to_spec() if p.kind == "fixed" else [p.to_spec()]
            return out
        offset = list(self.offsets) if len(self.offsets) > 1 else self.offsets[0]
        return (
            {"span": self.span, "offset": offset} if self.kind == "span" else {"marker": self.marker, "offset": offset}
        )

    def fields(self) -> tuple[str, ...]:
        """The record fields this rule reads (span rules), besides the text."""
        if self.kind == "span":
            return (self.span,)
        return tuple(dict.fromkeys(f for p in self.parts for f in p.fields()))

    def _offset(self) -> str:
        return str(list(self.offsets) if len(self.offsets) > 1 else self.offsets[0])

    def describe(self) -> str:
        if self.kind == "all":
            return "all non-special positions"
        if self.kind == "fixed":
            return f"positions {list(self.indices)}"
        if self.kind == "span":
            return f"last token of the {self.span!r} span + offset {self._offset()}"
        if self.kind == "union":
            return " and ".join(p.describe() for p in self.parts)
        return f"marker {self.marker!r} + offset {self._offset()}"

    def _matches(self, token: str) -> bool:
        return token == self.marker or (token.strip() != "" and token.strip() == self.marker.strip())

    @staticmethod
    def _span(ids: list[int], tok) -> tuple[int, int]:
        """(first text position, number of positions up to and including the last text token)."""
        n_text = len(ids) - (
            1 if tok.eos_id is not None and ids and ids[-1] == tok.eos_id and tok.eos_id != tok.bos_id else 0
        )
        start = 1 if tok.bos_id is not None and ids and ids[0] == tok.bos_id else 0
        return start, n_text

    def markers(self, ids: list[int], tok) -> list[int]:
        """Positions of the marker token among the text tokens."""
        start, n_text = self._span(ids, tok)
        tokens = tok.tokens_of(ids[:n_text])
        return [i for i in range(start, n_text) if self._matches(tokens[i])]

    def span_end(self, text: str | None, ids: list[int], tok, record: dict | None) -> int | None:
        """Position of the last token of the record's span in ``ids`` (the encoded ``text``); None if the record has
        no such field or the span does not occur in the text. It is the last token of the span's first
        occurrence: the token of ``ids`` that holds the span's last character."""
        sub = (record or {}).get(self.span)
        if not isinstance(sub, str) or not sub or text is None:
            return None
        at = text.find(sub)
        if at < 0:
            return None
        prefix = tok.encode(text[: at + len(sub)])
        if getattr(tok, "appends_eos", False) and prefix and prefix[-1] == tok.eos_id:
            prefix = prefix[:-1]
        n = 0
        while n < len(prefix) and n < len(ids) and prefix[n] == ids[n]:
            n += 1
        # the prefix's tokens begin the input's: its last one ends the span; else the token where they part holds
        # the span's end (a span that ends inside a token)
        return n - 1 if n == len(prefix) else n

    def apply(self, ids: list[int], tok, text: str | None = None, record: dict | None = None) -> list[int]:
        """The allowed positions of an encoded input (token ids with BOS, and EOS where the vocabulary has one).
        A span rule also needs the input's ``text`` and its ``record`` (the fields read with it)."""
        start, n_text = self._span(ids, tok)
        if self.kind == "all":
            return list(range(start, n_text))
        if self.kind == "fixed":
            return list(dict.fromkeys(i % n_text for i in self.indices if -n_text <= i < n_text))
        if self.kind == "union":  # every rule of the list must find its position(s) in the input
            each = [p.apply(ids, tok, text, record) for p in self.parts]
            return list(dict.fromkeys(i for pos in each for i in pos)) if all(each) else []
        if self.kind == "span":
            end = self.span_end(text, ids, tok, record)
            ends = [] if end is None else [end]
        else:
            ends = self.markers(ids, tok)
        return list(dict.fromkeys(i + o for i in ends for o in self.offsets if 0 <= i + o < n_text))

    def why_empty(self, text: str, ids: list[int], tok, record: dict | None = None) -> str:
        _, n_text = self._span(ids, tok)
        if self.kind == "all":
            return f"input {_short(text)} has no text tokens"
        if self.kind == "fixed":
            return (
                f"none of the positions {list(self.indices)} is inside input {_short(text)} "
                f"({n_text} tokens with BOS, EOS excluded)"
            )
        if self.kind == "union":
            return next(p.why_empty(text, ids, tok, record) for p in self.parts if not p.apply(ids, tok, text, record))
        if self.kind == "span":
            sub = (record or {}).get(self.span)
            if not isinstance(sub, str) or not sub:
                return f"input {_short(text)} has no {self.span!r} field (a string) for data.positions' span"
            if sub not in text:
                return f"its {self.span} {sub!r} does not occur in input {_short(text)}"
            return f"span {self.span!r} + offset {self._offset()} falls outside input {_short(text)}"
        if not self.markers(ids, tok):
            return f"marker {self.marker!r} does not occur in input {_short(text)}: every input needs one"
        return f"marker {self.marker!r} + offset {self._offset()} falls outside input {_short(text)}"


ALL = PositionRule("all")


# ---------------------------------------------------------------------------------------------- sources
class DataSource:
    """The interface the trainer uses (a built-in Task fits it too)."""

    name: str = "data"
    sites: tuple[str, ...] = ()  # default sites (a task's paper sites); none for user data

    def sample(self, rng: random.Random, split: str = "train") -> str:
        raise NotImplementedError

    def positions(self, text: str) -> list[int]:
        raise NotImplementedError


class _Ruled(DataSource):
    """Positions from a :class:`PositionRule` over the probed model's tokenization."""

    rule: PositionRule
    probed: ProbedModel | None = None

    def _probed(self) -> ProbedModel:
        """The probed model, whose tokenization the rule reads."""
        assert self.probed is not None, "a source with a position rule needs the probed model"
        return self.probed

    def record(self, text: str) -> dict | None:
        """The fields read with an input (for span rules); None where there are none."""
        return None

    def positions(self, text: str) -> list[int]:
        probed = self._probed()
        ids = probed.encode(text)
        record = self.record(text)
        pos = self.rule.apply(ids, probed.tokenizer, text, record)
        if not pos:
            raise UserError(f"{self.name}: {self.rule.why_empty(text, ids, probed.tokenizer, record)}")
        return pos

    def _check(self, texts: list[str], where, records: list[dict] | None = None) -> None:
        """Encode ``texts`` and apply the rule to each; the first problem is a one-line error."""
        probed = self._probed()
        tok = probed.tokenizer
        seen_marker, bad = False, None
        for k, text in enumerate(texts):
            try:
                ids = probed.encode(text)
            except UserError as e:
                raise UserError(f"{where(k)}: {e}") from None
            if self.rule.kind == "marker" and not seen_marker:
                seen_marker = bool(self.rule.markers(ids, tok))
            record = records[k] if records else None
            if bad is None and not self.rule.apply(ids, tok, text, record):
                bad = (k, text, ids, record)
        if self.rule.kind == "marker" and not seen_marker:
            raise UserError(
                f"marker {self.rule.marker!r} of data.positions never occurs in "
                f"{self._checked_what(len(texts))}: check the marker against the model's tokens"
            )
        if bad is not None:
            k, text, ids, record = bad
            raise UserError(f"{where(k)}: {self.rule.why_empty(text, ids, tok, record)}")

    def _checked_what(self, n: int) -> str:
        return self.name


class RuledTask(_Ruled):
    """A built-in task's inputs with another position rule."""

    def __init__(self, task, rule: PositionRule, probed, check: bool = True):
        self.task, self.rule, self.probed = task, rule, probed
        self.name, self.sites = f"task {task.name}", task.sites
        if check:
            rng = random.Random(0)
            self._check([task.sample(rng) for _ in range(200)], lambda k: f"input {k + 1} of {self.name}")

    def _checked_what(self, n: int) -> str:
        return f"{n} inputs of {self.name}"

    def sample(self, rng: random.Random, split: str = "train") -> str:
        return self.task.sample(rng, split)

    def annotate(self, text: str) -> str | None:
        return self.task.annotate(text)


class FileSource(_Ruled):
    """Inputs read from a file, with a fixed hash split into train and held-out test inputs.

    ``texts`` are the inputs in file order; ``lines`` (optional) their line or row numbers, for messages."""

    def __init__(
        self,
        texts: list[str],
        rule: PositionRule,
        probed,
        name: str = "data",
        lines: list[int] | None = None,
        unit: str = "line",
        check: bool = True,
        records: list[dict] | None = None,
    ):
        if not texts:
            raise UserError(f"data file {name} has no inputs (it is empty or has only blank lines)")
        self.texts, self.rule, self.probed, self.name = texts, rule, probed, name
        self.lines = lines or list(range(1, len(texts) + 1))
        self.unit = unit
        self.records = records  # the fields read with each input (span rules), parallel to texts
        self._records: dict[str, dict] = {}
        for t, r in zip(texts, records or ()):
            self._records.setdefault(t, r)
        if check:
            self._check(
                texts[:CHECKED], lambda k: f"{unit} {self.lines[k]} of {name}", records[:CHECKED] if records else None
            )
        test = [is_test(t) for t in texts]
        distinct = set(texts)
        if len(distinct) == 1:
            log.warning("%s has one distinct input: held-out evaluation uses it too", name)
            self.train, self.test = texts, texts
        else:
            everything = all(test)
            if everything or not any(test):  # a small file: hold out the input with the lowest hash (or keep
                # the one with the highest for training)
                pick = (max if everything else min)(distinct, key=lambda t: hashlib.sha1(t.encode()).digest())
                test = [(t == pick) != everything for t in texts]
            self.train = [t for t, x in zip(texts, test) if not x]
            self.test = [t for t, x in zip(texts, test) if x]
        log.info(
            "data: %d input%s from %s (%d held out for evaluation); query positions: %s",
            len(texts),
            "s" * (len(texts) != 1),
            name,
            len(self.test),
            rule.describe(),
        )

    def _checked_what(self, n: int) -> str:
        return f"the first {n} inputs of {self.name}" if len(self.texts) > n else self.name

    def record(self, text: str) -> dict | None:
        return self._records.get(text)

    def sample(self, rng: random.Random, split: str = "train") -> str:
        return rng.choice(self.test if split == "test" else self.train)


# ---------------------------------------------------------------------------------------------- reading files
def resolve_format(fmt: str, path: Path) -> str:
    """The data format: as given, or from the path (a directory: hf; .jsonl or .ndjson: jsonl; else text)."""
    if fmt:
        if fmt not in FORMATS:
            raise UserError(f"unknown data.format {fmt!r}: expected one of {', '.join(FORMATS)}")
        return fmt
    if path.is_dir():
        return "hf"
    return "jsonl" if path.suffix.lower() in (".jsonl", ".ndjson") else "text"


def read_records(path: str | Path, fmt: str = "", field: str = "text", keep: tuple[str, ...] = ()):
    """The inputs of a data file and the fields ``keep`` of each input's record (JSONL or HF data): ``(texts, lines,
    unit, records)``: line or row numbers, "line" or "row", and a list of dicts parallel to ``texts`` (a field a
    record lacks is left out). Blank lines are skipped."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"data file {path} does not exist")
    fmt = resolve_format(fmt, path)
    if keep and fmt == "text":
        raise UserError(
            f"data.positions reads the field {keep[0]!r} of each input, so {path} must be JSONL or a saved "
            "HF dataset with that field, not a text file"
        )
    if fmt == "hf":
        return _read_hf(path, field, keep)
    if path.is_dir():
        raise UserError(f'data file {path} is a directory: set format = "hf" for a dataset saved with save_to_disk')
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"data file {path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read data file {path}: {e.strerror}") from None
    texts, lines, records = [], [], []
    for n, line in enumerate(raw.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        rec = {}
        if fmt == "jsonl":
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise UserError(f"line {n} of {path} is not valid JSON ({e})") from None
            if not isinstance(obj, dict) or field not in obj:
                keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else "none: it is not an object"
                raise UserError(f"line {n} of {path} has no field {field!r} (set data.field; its keys: {keys})")
            line = obj[field]
            if not isinstance(line, str):
                raise UserError(f"line {n} of {path}: field {field!r} must be a string, got {type(line).__name__}")
            if not line:
                continue
            rec = {k: obj[k] for k in keep if k in obj}
        texts.append(line)
        lines.append(n)
        records.append(rec)
    if not texts:
        raise UserError(f"data file {path} has no inputs (it is empty or has only blank lines)")
    return texts, lines, "line", records


def _read_hf(path: Path, field: str, keep: tuple[str, ...] = ()):
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"reading the Hugging Face dataset {path} needs the datasets package: "
            "pip install datasets (or inversionview[data])"
        ) from None
    if not path.is_dir():
        raise UserError(f'data.format = "hf" needs a directory written by save_to_disk; {path} is not a directory')
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise UserError(
            f"could not load a dataset saved with save_to_disk from {path}: {str(e).splitlines()[0][:120]}"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise UserError(f"the dataset in {path} has splits {', '.join(ds)} and none is named 'train'")
    if field not in ds.column_names:
        raise UserError(
            f"the dataset in {path} has no column {field!r} (set data.field; its columns: {', '.join(ds.column_names)})"
        )
    for k in keep:
        if k not in ds.column_names:
            raise UserError(
                f"the dataset in {path} has no column {k!r}, which data.positions reads (its columns: "
                f"{', '.join(ds.column_names)})"
            )
    texts, rows, records = [], [], []
    extra = [ds[k] for k in keep]
    for n, t in enumerate(ds[field], 1):
        if not isinstance(t, str):
            raise UserError(f"row {n} of {path}: column {field!r} must hold strings, got {type(t).__name__}")
        if t.strip():
            texts.append(t)
            rows.append(n)
            records.append({k: col[n - 1] for k, col in zip(keep, extra)})
    if not texts:
        raise UserError(f"the dataset in {path} has no inputs (every {field!r} is empty)")
    return texts, rows, "row", records


# ---------------------------------------------------------------------------------------------- config
def check_spec(task: str | None, path: str, fmt: str, field: str, positions) -> None:
    """Refuse inconsistent [data] settings (before any model is loaded)."""
    if task is not None and not isinstance(task, str):
        raise UserError(f"config key 'task' in [data] must be a string, got {task!r}")
    if task and path:
        raise UserError(f"[data] gives both task = {task!r} and path = {path!r}: use one of them")
    if not task and not path:
        raise UserError('[data] needs the inputs: task = "counting" or path = "inputs.txt"')
    if fmt and fmt not in FORMATS:
        raise UserError(f"unknown data.format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if task and (fmt or field != "text"):
        raise UserError("data.format and data.field apply to data.path only, not to a task")
    if fmt == "text" and field != "text":
        raise UserError('data.field applies to jsonl and hf data only, not to format = "text"')
    rule = PositionRule.parse(positions)
    if task and rule is not None and rule.fields():
        raise UserError(
            f"data.positions reads the field {rule.fields()[0]!r} of each input: that needs a data file "
            "(path = ...), not a task"
        )


def record(task: str | None, path: str, fmt: str, field: str, positions) -> dict | None:
    """What run.json keeps of the data settings, so held-out queries can be drawn again; None for a plain task."""
    rule = PositionRule.parse(positions)
    if path:
        p = Path(path).expanduser().resolve()
        return {"path": str(p), "format": resolve_format(fmt, p), "field": field, "positions": (rule or ALL).to_spec()}
    if rule is not None:
        return {"positions": rule.to_spec()}
    return None


def open_source(task: str | None, data: dict | None, probed, check: bool = True):
    """The data source of a run: a task, a task with another position rule, or a :class:`FileSource`."""
    data = data or {}
    rule = PositionRule.parse(data.get("positions"))
    if data.get("path"):
        keep = rule.fields() if rule is not None else ()
        texts, lines, unit, records = read_records(
            data["path"], data.get("format", ""), data.get("field", "text"), keep
        )
        return FileSource(
            texts,
            rule or ALL,
            probed,
            name=str(data["path"]),
            lines=lines,
            unit=unit,
            check=check,
            records=records if keep else None,
        )
    if not task:
        raise UserError("this run names neither a task nor a data file to draw inputs from")
    from .tasks import get_task

    t = get_task(task)
    if rule is not None and rule.fields():
        raise UserError(
            f"data.positions reads the field {rule.fields()[0]!r} of each input: that needs a data file "
            "(path = ...), not a task"
        )
    if probed is not None:
        check_task_tokenizer(t, probed)
    from .tasks import GeneratorTask

    if rule is None and isinstance(t, GeneratorTask):  # a user's generator has no position rule of its own
        rule = ALL
    return t if rule is None else RuledTask(t, rule, probed, check=check)


def check_task_tokenizer(task, probed, n: int = 20) -> None:
    """A task that counts its positions in a named tokenizer's tokens (IOI: GPT-2's) needs a probed model that
    tokenizes its inputs the same way; a one-line error otherwise."""
    name = getattr(task, "tokenizer_name", None)
    if not name:
        return
    want = task.tokenizer()
    rng = random.Random(0)
    for _ in range(n):
        text = task.sample(rng)
        try:
            same = probed.tokenizer.encode(text) == want.encode(text)
        except UserError:
            same = False
        if not same:
            raise UserError(
                f"task {task.name} counts positions in {name} tokens, but the probed model's tokenizer "
                f'encodes {_short(text)} otherwise: set tokenizer = "{name}" in [probed]'
            )
