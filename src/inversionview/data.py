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
  if it equals it, leading and trailing spaces ignored (so GPT-2's ``" |"`` matches ``"|"``).

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

from .errors import UserError

log = logging.getLogger(__name__)

CHECKED = 1000
"""Inputs of a data file checked when it is opened (all of them if it has fewer)."""
FORMATS = ("text", "jsonl", "hf")
TEST_FRACTION = 0.1
POSITIONS_HELP = ('"all", a list of token indices like [3, -2], or a table like { marker = "|", offset = 1 }')


def is_test(text: str, fraction: float = TEST_FRACTION) -> bool:
    """The fixed train/test split of an input: a hash of its text (the same as a task's)."""
    return hashlib.sha1(text.encode()).digest()[0] < 256 * fraction


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


# ---------------------------------------------------------------------------------------------- positions
class PositionRule:
    """Which token positions of an input may be queried. See the module docstring for the three kinds."""

    def __init__(self, kind: str, indices: tuple[int, ...] = (), marker: str = "", offsets: tuple[int, ...] = ()):
        self.kind, self.indices, self.marker, self.offsets = kind, indices, marker, offsets

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
        if isinstance(value, dict):
            unknown = set(value) - {"marker", "offset"}
            if unknown:
                raise UserError(f"unknown key {sorted(unknown)[0]!r} in {where}: expected marker and offset")
            marker, offset = value.get("marker"), value.get("offset", 0)
            if not isinstance(marker, str) or not marker:
                raise UserError(f"{where} needs a marker token, e.g. {{ marker = \"|\", offset = 1 }}, got {marker!r}")
            offsets = [offset] if ints(offset) else offset
            if not (isinstance(offsets, (list, tuple)) and offsets and all(ints(o) for o in offsets)):
                raise UserError(f"{where}.offset must be an int or a list of ints, got {offset!r}")
            return cls("marker", marker=marker, offsets=tuple(offsets))
        raise UserError(f"{where} must be {POSITIONS_HELP}, got {value!r}")

    def to_spec(self):
        """The config value of this rule (what run.json records)."""
        if self.kind == "all":
            return "all"
        if self.kind == "fixed":
            return list(self.indices)
        return {"marker": self.marker, "offset": list(self.offsets) if len(self.offsets) > 1 else self.offsets[0]}

    def _offset(self) -> str:
        return str(list(self.offsets) if len(self.offsets) > 1 else self.offsets[0])

    def describe(self) -> str:
        if self.kind == "all":
            return "all non-special positions"
        if self.kind == "fixed":
            return f"positions {list(self.indices)}"
        return f"marker {self.marker!r} + offset {self._offset()}"

    def _matches(self, token: str) -> bool:
        return token == self.marker or (token.strip() != "" and token.strip() == self.marker.strip())

    @staticmethod
    def _span(ids: list[int], tok) -> tuple[int, int]:
        """(first text position, number of positions up to and including the last text token)."""
        n_text = len(ids) - (1 if tok.eos_id is not None and ids and ids[-1] == tok.eos_id and tok.eos_id != tok.bos_id else 0)
        start = 1 if tok.bos_id is not None and ids and ids[0] == tok.bos_id else 0
        return start, n_text

    def markers(self, ids: list[int], tok) -> list[int]:
        """Positions of the marker token among the text tokens."""
        start, n_text = self._span(ids, tok)
        tokens = tok.tokens_of(ids[:n_text])
        return [i for i in range(start, n_text) if self._matches(tokens[i])]

    def apply(self, ids: list[int], tok) -> list[int]:
        """The allowed positions of an encoded input (token ids with BOS, and EOS where the vocabulary has one)."""
        start, n_text = self._span(ids, tok)
        if self.kind == "all":
            return list(range(start, n_text))
        if self.kind == "fixed":
            return list(dict.fromkeys(i % n_text for i in self.indices if -n_text <= i < n_text))
        return list(dict.fromkeys(i + o for i in self.markers(ids, tok) for o in self.offsets if 0 <= i + o < n_text))

    def why_empty(self, text: str, ids: list[int], tok) -> str:
        _, n_text = self._span(ids, tok)
        if self.kind == "all":
            return f"input {_short(text)} has no text tokens"
        if self.kind == "fixed":
            return (f"none of the positions {list(self.indices)} is inside input {_short(text)} "
                    f"({n_text} tokens with BOS, EOS excluded)")
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
    probed = None

    def positions(self, text: str) -> list[int]:
        ids = self.probed.encode(text)
        pos = self.rule.apply(ids, self.probed.tokenizer)
        if not pos:
            raise UserError(f"{self.name}: {self.rule.why_empty(text, ids, self.probed.tokenizer)}")
        return pos

    def _check(self, texts: list[str], where) -> None:
        """Encode ``texts`` and apply the rule to each; the first problem is a one-line error."""
        tok = self.probed.tokenizer
        seen_marker, bad = False, None
        for k, text in enumerate(texts):
            try:
                ids = self.probed.encode(text)
            except UserError as e:
                raise UserError(f"{where(k)}: {e}") from None
            if self.rule.kind == "marker" and not seen_marker:
                seen_marker = bool(self.rule.markers(ids, tok))
            if bad is None and not self.rule.apply(ids, tok):
                bad = (k, text, ids)
        if self.rule.kind == "marker" and not seen_marker:
            raise UserError(f"marker {self.rule.marker!r} of data.positions never occurs in "
                            f"{self._checked_what(len(texts))}: check the marker against the model's tokens")
        if bad is not None:
            k, text, ids = bad
            raise UserError(f"{where(k)}: {self.rule.why_empty(text, ids, tok)}")

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

    def __init__(self, texts: list[str], rule: PositionRule, probed, name: str = "data",
                 lines: list[int] | None = None, unit: str = "line", check: bool = True):
        if not texts:
            raise UserError(f"data file {name} has no inputs (it is empty or has only blank lines)")
        self.texts, self.rule, self.probed, self.name = texts, rule, probed, name
        self.lines = lines or list(range(1, len(texts) + 1))
        self.unit = unit
        if check:
            self._check(texts[:CHECKED], lambda k: f"{unit} {self.lines[k]} of {name}")
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
        log.info("data: %d input%s from %s (%d held out for evaluation); query positions: %s",
                 len(texts), "s" * (len(texts) != 1), name, len(self.test), rule.describe())

    def _checked_what(self, n: int) -> str:
        return f"the first {n} inputs of {self.name}" if len(self.texts) > n else self.name

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


def read_inputs(path: str | Path, fmt: str = "", field: str = "text") -> tuple[list[str], list[int], str]:
    """The inputs of a data file: ``(texts, line or row numbers, "line" or "row")``. Blank lines are skipped."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"data file {path} does not exist")
    fmt = resolve_format(fmt, path)
    if fmt == "hf":
        return _read_hf(path, field)
    if path.is_dir():
        raise UserError(f"data file {path} is a directory: set format = \"hf\" for a dataset saved with save_to_disk")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"data file {path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read data file {path}: {e.strerror}") from None
    texts, lines = [], []
    for n, line in enumerate(raw.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
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
        texts.append(line)
        lines.append(n)
    if not texts:
        raise UserError(f"data file {path} has no inputs (it is empty or has only blank lines)")
    return texts, lines, "line"


def _read_hf(path: Path, field: str) -> tuple[list[str], list[int], str]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"reading the Hugging Face dataset {path} needs the datasets package: "
                        "pip install datasets (or inversionview[data])") from None
    if not path.is_dir():
        raise UserError(f"data.format = \"hf\" needs a directory written by save_to_disk; {path} is not a directory")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise UserError(f"could not load a dataset saved with save_to_disk from {path}: {str(e).splitlines()[0][:120]}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise UserError(f"the dataset in {path} has splits {', '.join(ds)} and none is named 'train'")
    if field not in ds.column_names:
        raise UserError(f"the dataset in {path} has no column {field!r} (set data.field; its columns: "
                        f"{', '.join(ds.column_names)})")
    texts, rows = [], []
    for n, t in enumerate(ds[field], 1):
        if not isinstance(t, str):
            raise UserError(f"row {n} of {path}: column {field!r} must hold strings, got {type(t).__name__}")
        if t.strip():
            texts.append(t)
            rows.append(n)
    if not texts:
        raise UserError(f"the dataset in {path} has no inputs (every {field!r} is empty)")
    return texts, rows, "row"


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
    PositionRule.parse(positions)


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
        texts, lines, unit = read_inputs(data["path"], data.get("format", ""), data.get("field", "text"))
        return FileSource(texts, rule or ALL, probed, name=str(data["path"]), lines=lines, unit=unit, check=check)
    if not task:
        raise UserError("this run names neither a task nor a data file to draw inputs from")
    from .tasks import get_task

    t = get_task(task)
    return t if rule is None else RuledTask(t, rule, probed, check=check)
