"""Causal verification by cumulative activation patching (METHOD.md §5).

A *pair* is an original input and a contrast input of the same length whose answer differs. The probed model runs
the original with chosen *components* at chosen positions replaced by the contrast's values, and the metric is the
logit difference at the answer position (the position whose prediction is the answer token)::

    LD = logit[y_orig] - logit[y_con]

Components:

``a{L}.{H}`` (or ``blocks.{L}.attn.hook_result.{H}``)
    head H's result in layer L. It is patched as the head's slice of the attention's pre-projection z (the input
    of the output projection), which is exactly equivalent: the result is that slice times W_O[h], a linear map.
``embed`` (``hook_embed``), ``pos_embed`` (``hook_pos_embed``)
    the token and (GPT-2's learned) positional embeddings.

Each component is written with its position, ``COMPONENT@POSITION``: an index (BOS = 0, negative counts back from
the last text token, EOS excluded) or a token (its first occurrence), read per input as query positions are. For
counting ``a0.0@-3`` is head 0.0 at the target character and ``a1.0@:`` head 1.0 at ``:``.

Cumulative patching of a path c1, ..., ck: left to right patches {c1}, {c1, c2}, ..., all; right to left {ck},
{c(k-1), ck}, ..., all. Over many random pairs :func:`cumulative` reports the mean and standard deviation of LD at
each step. Contrast generators (:func:`make_pairs`): counting replaces one character of the letters so that the
target's count changes by one (one occurrence of the target by another letter of the input, or one occurrence of
another letter by the target; every letter stays present, the length is kept); addition resamples the digits at
chosen places (F1 F2 F3 of the first operand, S1 S2 S3 of the second) until the chosen answer digit changes, with
the sum's length kept.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from .errors import UserError
from .probed import ProbedModel

EMBED = ("embed", "hook_embed")
POS_EMBED = ("pos_embed", "hook_pos_embed")
PLACES = ("F1", "F2", "F3", "S1", "S2", "S3")
COUNTING_PATH = ("a0.0@-3", "a1.0@:")  # the paper's path: head 0.0 at the target character, head 1.0 at ':'
PAPER = {"ld_before": 18.2, "ld_after": -17.3, "effect": 35.5}  # the paper's counting numbers (about)


# ---------------------------------------------------------------------------------------------- components
@dataclass(frozen=True)
class Component:
    """One patched component at one position rule: ``kind`` is "head", "embed" or "pos_embed"."""

    kind: str
    position: int | str
    layer: int | None = None
    head: int | None = None

    @property
    def name(self) -> str:
        what = f"a{self.layer}.{self.head}" if self.kind == "head" else self.kind
        return f"{what}@{self.position}"


def parse_component(probed: ProbedModel, spec: str) -> Component:
    """``COMPONENT@POSITION``, e.g. ``a0.0@-3``, ``a1.0@:``, ``embed@5``."""
    name, sep, pos = str(spec).strip().partition("@")
    name = name.strip()
    if not sep or not pos.strip():
        raise UserError(f"component {spec!r} has no position: write COMPONENT@POSITION, e.g. a0.0@-3 or a1.0@:")
    pos = pos.strip()
    position = int(pos) if pos.lstrip("-").isdigit() else pos
    if name in EMBED:
        return Component("embed", position)
    if name in POS_EMBED:
        if probed.family is None or probed.family.name != "GPT-2":
            raise UserError("pos_embed: only GPT-2-family models have a learned positional embedding to patch")
        return Component("pos_embed", position)
    expected = "expected a head result a{L}.{H} (e.g. a0.0), embed or pos_embed"
    try:
        site = probed.site(name)
    except UserError as e:
        why = f" ({e})" if name.startswith(("a", "blocks.")) else ""
        raise UserError(f"unknown component {name!r}{why}: {expected}") from None
    if site.kind != "result":
        raise UserError(f"unknown component {name!r}: {site.short} is not a head result; {expected}")
    return Component("head", position, site.layer, site.head)


def _resolve(probed, comp: Component, ids: list[int]) -> int:
    from .preimage import resolve_position

    tok = probed.tokenizer
    n_text = len(ids) - (1 if tok.eos_id is not None and ids[-1] == tok.eos_id and tok.eos_id != tok.bos_id else 0)
    try:
        return resolve_position(tok.tokens_of(ids), n_text, comp.position)
    except UserError as e:
        raise UserError(f"component {comp.name}: {e} in {tok.text(ids)!r}") from None


# ---------------------------------------------------------------------------------------------- running
def _hooks(probed: ProbedModel, comps: list[Component], masks: list[torch.Tensor], cache: dict | None, record: dict):
    """Forward hooks that record each component's value (``record``) and, where ``cache`` is given, replace it at
    the masked positions by the cached value. Returns the hook handles."""
    handles = []
    heads: dict[int, list] = {}
    for c, m in zip(comps, masks):
        if c.kind == "head":
            assert c.layer is not None  # a head component names its layer
            heads.setdefault(c.layer, []).append((c.head, m))
        else:
            mod = probed.model.get_input_embeddings() if c.kind == "embed" else probed.model.transformer.wpe
            key = c.kind

            def hook(module, args, out, key=key, m=m):
                out = out.expand(m.shape[0], -1, -1) if out.shape[0] != m.shape[0] else out
                record[key] = out
                if cache is not None:
                    return torch.where(m[..., None], cache[key], out)

            handles.append(mod.register_forward_hook(hook))
    for layer, hs in heads.items():
        mod, _ = probed._hook_point((layer, "z"))

        def pre(module, args, kwargs, layer=layer, hs=hs):
            z = args[0] if args else kwargs["hidden_states"]
            record[("z", layer)] = z
            if cache is None:
                return None
            dh = z.shape[-1] // probed.n_heads
            z = z.clone()
            for h, m in hs:
                sl = slice(h * dh, (h + 1) * dh)
                z[..., sl] = torch.where(m[..., None], cache[("z", layer)][..., sl], z[..., sl])
            return ((z, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": z})

        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
    return handles


@torch.no_grad()
def run_patched(
    probed: ProbedModel, ids: torch.Tensor, contrast: torch.Tensor, comps: list[Component], masks: list[torch.Tensor]
) -> torch.Tensor:
    """Logits (B, T, V) of ``ids`` (B, T) with each component replaced, where its mask (B, T) is true, by its value
    in the run of ``contrast`` (B, T). With no components this is the plain run of ``ids``."""
    cache: dict = {}
    if comps:
        handles = _hooks(probed, comps, masks, None, cache)
        try:
            _logits(probed, contrast)
        finally:
            for h in handles:
                h.remove()
    handles = _hooks(probed, comps, masks, cache, {})
    try:
        return _logits(probed, ids)
    finally:
        for h in handles:
            h.remove()


def _logits(probed, ids):
    out = probed.model(
        input_ids=ids.to(probed.device), attention_mask=torch.ones_like(ids, device=probed.device), use_cache=False
    )
    return out.logits.float().cpu()


# ---------------------------------------------------------------------------------------------- pairs
@dataclass(frozen=True)
class Pair:
    """An original input and its contrast (same length); the answer position predicts y_orig (y_con)."""

    text: str
    contrast: str
    answer_position: int  # token index whose prediction is the answer token
    y_orig: str
    y_con: str


def _counting_contrast(text: str, rng: random.Random) -> Pair | None:
    head, _, tail = text.partition("|")
    t, c = tail[0], head.count(tail[0])
    others = sorted(set(head) - {t})
    moves = []
    if c >= 2:  # one t -> another letter of the input (still at most 9 of it)
        moves += [("down", o) for o in others if head.count(o) < 9]
    if c <= 8:  # one occurrence of another letter (which keeps at least one) -> t
        moves += [("up", o) for o in others if head.count(o) >= 2]
    if not moves:
        return None
    way, o = rng.choice(moves)
    src, dst = (t, o) if way == "down" else (o, t)
    i = rng.choice([k for k, ch in enumerate(head) if ch == src])
    new = head[:i] + dst + head[i + 1 :]
    n = new.count(t)
    return Pair(text, f"{new}|{t}:{n}", len(text) - 1, str(c), str(n))  # ':' is token len(text) - 1 (BOS = 0)


def _addition_contrast(text: str, rng: random.Random, places: tuple[str, ...], answer: int) -> Pair | None:
    lhs, c = text.split("=")
    digits = list(lhs.replace("+", ""))
    if answer >= len(c):
        return None
    for _ in range(200):
        d = list(digits)
        for p in places:
            k = PLACES.index(p)
            d[k] = str(rng.randint(1 if k in (0, 3) else 0, 9))
        a, b = int("".join(d[:3])), int("".join(d[3:]))
        s = str(a + b)
        if len(s) == len(c) and s[answer] != c[answer]:
            return Pair(text, f"{a}+{b}={s}", len(lhs) + 1 + answer, c[answer], s[answer])
    return None


def make_pairs(task, n: int, seed: int = 0, places: tuple[str, ...] | None = None, answer: int = 0) -> list[Pair]:
    """``n`` random pairs for a built-in task (test-split inputs). ``places`` and ``answer`` (the index of the sum's
    digit whose logit difference is measured) apply to addition; default places: all six digits."""
    name = getattr(task, "name", None)
    if name not in ("counting", "addition"):
        raise UserError(f"no contrast generator for task {name!r}: expected counting or addition")
    if n < 1:
        raise UserError(f"pairs must be at least 1, got {n}")
    places = tuple(places or PLACES)  # used by addition only
    if name == "addition":
        bad = [p for p in places if p not in PLACES]
        if bad:
            raise UserError(f"unknown digit place {bad[0]!r}: expected some of {', '.join(PLACES)}")
        if not 0 <= answer <= 3:
            raise UserError(f"answer digit must be 0..3 (the sum's first to fourth digit), got {answer}")
    rng, out = random.Random(seed), []
    for _ in range(100 * n):
        text = task.sample(rng, "test")
        p = _counting_contrast(text, rng) if name == "counting" else _addition_contrast(text, rng, places, answer)
        if p is not None:
            out.append(p)
            if len(out) == n:
                return out
    raise UserError(f"could not build {n} contrast pairs for these settings (got {len(out)})")


# ---------------------------------------------------------------------------------------------- cumulative patching
@dataclass(frozen=True)
class Step:
    patched: tuple[str, ...]
    mean: float
    std: float


@dataclass(frozen=True)
class PatchResult:
    """Cumulative patching over ``pairs`` pairs: LD before (no patch), after each left-to-right and right-to-left
    step, and LD of the contrast's own run (what a complete patch would reach)."""

    path: tuple[str, ...]
    pairs: int
    before: Step
    contrast: Step
    left_to_right: tuple[Step, ...]
    right_to_left: tuple[Step, ...]
    lds: dict = field(repr=False, default_factory=dict)  # step label -> per-pair LDs

    @property
    def ld_before(self) -> float:
        return self.before.mean

    @property
    def ld_after(self) -> float:
        return self.left_to_right[-1].mean

    @property
    def effect(self) -> float:
        return self.ld_before - self.ld_after

    def to_dict(self) -> dict:
        step = lambda s: {"patched": list(s.patched), "mean": s.mean, "std": s.std}  # noqa: E731
        return {
            "path": list(self.path),
            "pairs": self.pairs,
            "ld_before": self.ld_before,
            "ld_after": self.ld_after,
            "effect": self.effect,
            "contrast": step(self.contrast),
            "left_to_right": [step(s) for s in self.left_to_right],
            "right_to_left": [step(s) for s in self.right_to_left],
        }

    def table(self) -> str:
        rows = [("none (original)", self.before)]
        rows += [("L->R " + " + ".join(s.patched), s) for s in self.left_to_right]
        rows += [("R->L " + " + ".join(s.patched), s) for s in self.right_to_left]
        rows += [("contrast's own run", self.contrast)]
        w = max(len(r[0]) for r in rows)
        out = [f"{'patched':<{w}}  {'mean LD':>8}  {'std':>6}", "-" * (w + 18)]
        out += [f"{label:<{w}}  {s.mean:8.2f}  {s.std:6.2f}" for label, s in rows]
        out.append(
            f"effect of the whole path: {self.effect:.2f} (LD {self.ld_before:.2f} -> {self.ld_after:.2f}, "
            f"{self.pairs} pairs; LD = logit[y_orig] - logit[y_con] at the answer position)"
        )
        return "\n".join(out)


def _step(patched, lds: torch.Tensor) -> Step:
    return Step(tuple(patched), float(lds.mean()), float(lds.std()) if len(lds) > 1 else 0.0)


@torch.no_grad()
def cumulative(
    probed: ProbedModel, pairs: list[Pair], path: list[str] | tuple[str, ...], batch: int = 512
) -> PatchResult:
    """Cumulative patching of ``path`` (``COMPONENT@POSITION`` items, in order) over ``pairs``."""
    comps = [parse_component(probed, p) for p in path]
    if not comps:
        raise UserError("give at least one component to patch (COMPONENT@POSITION)")
    if not pairs:
        raise UserError("give at least one contrast pair")
    k = len(comps)
    sets: dict[str, list[int]] = {"none": []}
    sets.update({f"l2r{i}": list(range(i + 1)) for i in range(k)})
    sets.update({f"r2l{i}": list(range(k - 1 - i, k)) for i in range(k)})
    parts: dict[str, list[torch.Tensor]] = {key: [] for key in [*sets, "contrast"]}  # per batch
    tok = probed.tokenizer
    for s in range(0, len(pairs), batch):
        chunk = pairs[s : s + batch]
        orig = [probed.encode(p.text) for p in chunk]
        con = [probed.encode(p.contrast) for p in chunk]
        for p, a, b in zip(chunk, orig, con):
            if len(a) != len(b):
                raise UserError(
                    f"contrast {p.contrast!r} has {len(b)} tokens but {p.text!r} has {len(a)}: "
                    "a pair must have the same length"
                )
        bo, bc = probed.batch(orig), probed.batch(con)
        B, T = bo.ids.shape
        masks = []
        for c in comps:
            m = torch.zeros(B, T, dtype=torch.bool)
            for i, ids in enumerate(orig):
                m[i, _resolve(probed, c, ids)] = True
            masks.append(m)
        ans = torch.tensor([p.answer_position for p in chunk])
        yo = torch.tensor([tok.encode(p.y_orig)[1] for p in chunk])
        yc = torch.tensor([tok.encode(p.y_con)[1] for p in chunk])
        rows = torch.arange(B)

        def ld(logits):
            at = logits[rows, ans]
            return at[rows, yo] - at[rows, yc]

        for key, idx in sets.items():
            logits = run_patched(probed, bo.ids, bc.ids, [comps[i] for i in idx], [masks[i] for i in idx])
            parts[key].append(ld(logits))
        parts["contrast"].append(ld(run_patched(probed, bc.ids, bc.ids, [], [])))
    lds = {key: torch.cat(v) for key, v in parts.items()}
    names = [c.name for c in comps]
    return PatchResult(
        path=tuple(names),
        pairs=len(pairs),
        before=_step((), lds["none"]),
        contrast=_step(("contrast",), lds["contrast"]),
        left_to_right=tuple(_step(names[: i + 1], lds[f"l2r{i}"]) for i in range(k)),
        right_to_left=tuple(_step(names[k - 1 - i :], lds[f"r2l{i}"]) for i in range(k)),
        lds={key: v.tolist() for key, v in lds.items()},
    )


def load_probed(ref: str, task: str | None = None) -> tuple[ProbedModel, object]:
    """A probed model and its task from a run directory, ``shipped:TASK`` or a model directory (then ``task``)."""
    from pathlib import Path

    from .run import RunSpec, resolve_model
    from .tasks import get_task

    ref = str(ref)
    if ref.startswith("shipped:"):
        probed = ProbedModel.load(resolve_model(ref))
        task = task or ref.split(":", 1)[1]
    elif (Path(ref) / "run.json").is_file():
        spec = RunSpec.load(Path(ref))
        probed = spec.load_probed()
        task = task or spec.task
    else:
        probed = ProbedModel.load(ref)
    if not task:
        raise UserError(f"{ref} names no task: give --task counting or --task addition")
    return probed, get_task(task)


def reproduce_counting_path(probed: ProbedModel | None = None, pairs: int = 200, seed: int = 0) -> dict:
    """The paper's counting path (head 0.0 at the target character, then head 1.0 at ':') patched over ``pairs``
    random pairs on the shipped counting model (or ``probed``): the mean LD before and after, the effect, the pairs."""
    from .tasks import get_task

    if probed is None:
        probed, _ = load_probed("shipped:counting")
    res = cumulative(probed, make_pairs(get_task("counting"), pairs, seed), COUNTING_PATH)
    return {
        "ld_before": res.ld_before,
        "ld_after": res.ld_after,
        "effect": res.effect,
        "pairs": res.pairs,
        "ld_contrast": res.contrast.mean,
        "table": res.table(),
        "paper": dict(PAPER),
    }
