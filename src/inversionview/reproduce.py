"""``inversionview reproduce counting|addition``: the paper's claims C1-C3 and A1-A3 (METHOD.md §6) checked on the
shipped models with feature consistency rates (:mod:`inversionview.fcr`) and, for C3, activation patching
(:mod:`inversionview.patching`).

Each claim is a list of checks (site, position of the task's rule, feature, expectation). Rules:

- *carries*: FCR >= 0.9 and FCR - baseline >= 0.3;
- *approx.*: FCR >= 0.6 and FCR - baseline >= 0.3 (the paper's "approximately");
- *varies*: neither rule holds (as ``explain`` marks nothing): a feature that most in-epsilon samples share far above
  chance is partly carried, not varying;
- *flips* (C3's patching): the mean logit difference is positive before patching and negative after it. It is
  checked for the whole path and for its first link alone (head 0.0 at the target character): if the count
  travels that one path, patching its start already flips the answer.

A claim is *supported* when every check holds, *partly supported* when some do, *not supported* when none do.
"""

from __future__ import annotations

import logging
import textwrap
from dataclasses import asdict, dataclass

from .errors import UserError
from .fcr import CARRIES, MARGIN, PARTLY, random_values
from .features import resolve_features

log = logging.getLogger(__name__)

RULES = (
    f"carries: FCR >= {CARRIES} and FCR - baseline >= {MARGIN}; approx.: FCR >= {PARTLY} and FCR - baseline "
    f">= {MARGIN}; varies: neither rule holds; flips: mean LD > 0 before patching and < 0 after. A claim is "
    "supported when all its checks hold, partly supported when some do, not supported when none do."
)

# claim -> (the paper's statement, [(site, index into the task's positions, feature, expectation)]); the index is
# None for a patching check
ClaimCheck = tuple[str, int | None, str, str]
CLAIMS: dict[str, dict[str, tuple[str, list[ClaimCheck]]]] = {
    "counting": {
        "C1": (
            "after the layer-0 MLP (x0.post), at the target character, in-preimage samples have the query's count",
            [("x0.post", 0, "count", "carries")],
        ),
        "C2": (
            "at layer 1 on ':' (head 1.0), samples keep the count but the target letter varies",
            [("a1.0", 1, "count", "carries"), ("a1.0", 1, "target", "varies")],
        ),
        "C3": (
            "the count travels one path, head 0.0 at the target character to head 1.0 at ':'; patching the path "
            "flips the answer: LD about 18.2 -> about -17 (effect about 35.5)",
            [
                ("a0.0", 0, "count", "carries"),
                ("a1.0", 1, "count", "carries"),
                ("a0.0@-3", None, "LD", "flips"),
                ("a0.0@-3 + a1.0@:", None, "LD", "flips"),
            ],
        ),
    },
    "addition": {
        "A1": (
            "at '=', heads 0.0, 0.1 and 0.2 carry the hundreds digits as an unordered pair {F1,S1}",
            [("a0.0", 0, "F1S1", "carries"), ("a0.1", 0, "F1S1", "carries"), ("a0.2", 0, "F1S1", "carries")],
        ),
        "A2": ("head 0.3 at '=' carries the tens digits {F2,S2}, approximately", [("a0.3", 0, "F2S2", "approx.")]),
        "A3": (
            "x0.mid at '=' carries the hundreds pair {F1,S1} plus the carry from the tens",
            [("x0.mid", 0, "F1S1", "carries"), ("x0.mid", 0, "carry_tens", "carries")],
        ),
    },
}
# Other models trained on the same task may give the heads other roles: for these features, every layer-0 head at
# '=' is measured and listed beside the table.
ROLES = {"addition": ("F1S1", "F2S2", "F3S3", "carry_tens")}
HEADS = {"addition": ("a0.0", "a0.1", "a0.2", "a0.3")}


@dataclass(frozen=True)
class Check:
    claim: str
    site: str
    position: str
    feature: str
    expect: str
    value: float | None  # FCR, or the LD after patching
    baseline: float | None  # the FCR baseline, or the LD before patching
    samples: int  # in-epsilon samples (FCR) or contrast pairs (patching)
    queries: int
    empty: int = 0
    detail: str = ""
    low: float | None = None  # the FCR's 95% interval
    high: float | None = None

    @property
    def holds(self) -> bool:
        v, b = self.value, self.baseline
        if v is None or b is None:
            return False
        if self.expect == "flips":
            return b > 0 > v
        above = v - b >= MARGIN - 1e-9
        carries = v >= CARRIES and above
        if self.expect == "carries":
            return carries
        if self.expect == "approx.":
            return v >= PARTLY and above
        return not (v >= PARTLY and above)  # varies


@dataclass(frozen=True)
class Claim:
    name: str
    paper: str
    checks: tuple[Check, ...]

    @property
    def verdict(self) -> str:
        n = sum(c.holds for c in self.checks)
        return "supported" if n == len(self.checks) else "partly supported" if n else "not supported"


@dataclass(frozen=True)
class Reproduction:
    task: str
    claims: tuple[Claim, ...]
    queries: int
    samples: int
    roles: dict  # feature -> [(head, FCR)] best first
    rules: str = RULES

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "queries": self.queries,
            "samples": self.samples,
            "rules": self.rules,
            "roles": self.roles,
            "claims": [
                {
                    "claim": c.name,
                    "paper": c.paper,
                    "verdict": c.verdict,
                    "checks": [{**asdict(k), "holds": k.holds} for k in c.checks],
                }
                for c in self.claims
            ],
        }

    def table(self) -> str:
        rows = [row for c in self.claims for row in _claim_rows(c)]
        w = [max(len(str(r[j])) for r in [_TABLE_HEAD, *rows]) for j in range(len(_TABLE_HEAD))]

        def fmt(r):
            return "  ".join(str(x).ljust(w[j]) for j, x in enumerate(r)).rstrip()

        out = [fmt(_TABLE_HEAD), fmt(["-" * x for x in w])] + [fmt(r) for r in rows]
        return "\n".join(out + [""] + [textwrap.fill(n, 118) for n in self._notes()])

    def _notes(self) -> list[str]:
        """The paragraphs under the table: what its columns measure, the rules, each check's detail, the roles."""
        notes = [
            f"measured: FCR = mean over {self.queries} held-out queries of the share of the preimage's members "
            f"whose feature equals the query's, estimated under the task's input distribution by chains on the "
            f"preimage started from exact generator draws (the decoder's members where none lands inside; "
            f"{self.samples} candidates per query, Auto mix, epsilon 0.1), with its "
            "95% interval; n: distinct members / queries measured (queries with no member are left out: "
            "'empty'); baseline: the same share among random inputs of the task. For patching, measured is the "
            "mean LD with the row's components patched, baseline the mean LD before, n the contrast pairs.",
            self.rules,
        ]
        for d in {k.detail for c in self.claims for k in c.checks if k.detail}:
            notes.append(d)
        if self.roles:
            notes.append(
                "layer-0 heads at '=' by FCR (another model may give its heads other roles): "
                + "; ".join(f"{f}: " + ", ".join(f"{h} {v:.2f}" for h, v in hs) for f, hs in self.roles.items())
            )
        return notes


_TABLE_HEAD = (
    "claim",
    "the paper's statement",
    "site @ position",
    "feature",
    "expect",
    "measured",
    "n",
    "baseline",
    "holds",
    "verdict",
)


def _measured(k: Check) -> tuple[str, str, str]:
    """A check's measured value, its n and its baseline as the table shows them."""
    if k.expect == "flips":
        measured = "LD -" if k.value is None else f"LD {k.value:.1f}"
        base = "-" if k.baseline is None else f"LD {k.baseline:.1f}"
        return measured, f"{k.samples} pairs", base
    measured = "FCR -" if k.value is None else f"FCR {k.value:.2f} [{k.low:.2f}-{k.high:.2f}]"
    base = "-" if k.baseline is None else f"{k.baseline:.2f}"
    n = f"{k.samples}/{k.queries}q" + (f" ({k.empty} empty)" if k.empty else "")
    return measured, n, base


def _claim_rows(c: Claim) -> list[list[str]]:
    """A claim's rows of the table: one per check, the paper's statement wrapped down the second column (with rows
    of its own where it is longer than the checks)."""
    paper = textwrap.wrap(c.paper, 46)
    rows = []
    for i, k in enumerate(c.checks):
        measured, n, base = _measured(k)
        where = f"{k.site} @ {k.position}" if k.position else k.site
        rows.append(
            [
                c.name if i == 0 else "",
                paper[i] if i < len(paper) else "",
                where,
                k.feature,
                k.expect,
                measured,
                n,
                base,
                "yes" if k.holds else "no",
                c.verdict if i == 0 else "",
            ]
        )
    return rows + [["", line] + [""] * 8 for line in paper[len(c.checks) :]]


def _patching(iv, pairs: int, seed: int):
    """C3's patching: the paper's counting path (:data:`inversionview.patching.COUNTING_PATH`) patched cumulatively
    over ``pairs`` contrast pairs. Returns the mean LD after each left-to-right step by its label (e.g.
    ``"a0.0@-3 + a1.0@:"``), the mean LD before, the pairs and a note for the table."""
    from .patching import COUNTING_PATH, cumulative, make_pairs

    res = cumulative(iv.probed, make_pairs(iv.task, pairs, seed), COUNTING_PATH)
    steps = {" + ".join(st.patched): st.mean for st in res.left_to_right}
    alone = {" + ".join(st.patched): st.mean for st in res.right_to_left}
    detail = (
        f"C3 patching: head 0.0 at the target character (a0.0@-3) and head 1.0 at ':' patched from a contrast "
        f"input whose count differs; mean LD {res.ld_before:.1f} before, {res.ld_after:.1f} after the whole "
        f"path, effect {res.effect:.1f} over {res.pairs} pairs; a0.0@-3 alone {steps['a0.0@-3']:.1f}, a1.0@: "
        f"alone {alone['a1.0@:']:.1f}; LD {res.contrast.mean:.1f} on the contrast inputs (paper: about 18.2, "
        "about -17, 35.5)."
    )
    return steps, res.ld_before, res.pairs, detail


def reproduce(
    task: str, queries: int = 64, samples: int = 256, pairs: int = 200, seed: int = 0, progress: bool = True
) -> Reproduction:
    """Check the paper's claims for ``task`` ("counting" or "addition") on the shipped model and decoder."""
    from tqdm import tqdm

    from .fcr import measure
    from .run import InversionView

    if task not in CLAIMS:
        raise UserError(f"reproduce: unknown task {task!r}: expected one of {', '.join(CLAIMS)}")
    if queries < 1 or samples < 1 or pairs < 1:
        raise UserError(f"queries, samples and pairs must be at least 1, got {queries}, {samples} and {pairs}")
    iv = InversionView.load(f"shipped:{task}")
    feats = resolve_features(iv.task)
    reference = random_values(iv.task, feats, seed=seed)
    measured = {}
    for (site, k), names in tqdm(list(_wanted(task).items()), desc=f"reproduce {task}", disable=not progress):
        sub = {n: feats[n] for n in sorted(names)}
        for r in measure(iv, site, k, sub, queries, samples, seed, reference):
            measured[(site, k, r.feature)] = r
    claims = _claims(iv, task, measured, pairs, seed)
    return Reproduction(task, claims, queries, samples, _roles(task, measured))


def _wanted(task: str) -> dict[tuple[str, int], set[str]]:
    """The features to measure at each (site, position index): those of the task's FCR checks, and the roles'
    features at every layer-0 head (:data:`ROLES`, :data:`HEADS`)."""
    wanted: dict[tuple[str, int], set[str]] = {}
    for _, checks in CLAIMS[task].values():
        for site, k, feat, _ in checks:
            if k is not None:
                wanted.setdefault((site, k), set()).add(feat)
    for h in HEADS.get(task, ()):
        wanted.setdefault((h, 0), set()).update(ROLES[task])
    return wanted


def _claims(iv, task: str, measured: dict, pairs: int, seed: int) -> tuple[Claim, ...]:
    """The task's claims with their checks: FCR checks from ``measured`` (by site, position index and feature),
    patching checks from C3's patching (run once, where a claim has one)."""
    out, patched = [], None
    for name, (paper, checks) in CLAIMS[task].items():
        rows = []
        for site, k, feat, expect in checks:
            if k is None:  # a patching check: site names the components patched
                patched = patched or _patching(iv, pairs, seed)
                steps, before, n, detail = patched
                rows.append(Check(name, f"patch {site}", "", "LD", expect, steps[site], before, n, 0, 0, detail))
                continue
            r = measured[(site, k, feat)]
            rows.append(
                Check(
                    name,
                    site,
                    r.position,
                    feat,
                    expect,
                    r.fcr,
                    r.baseline,
                    r.samples,
                    r.queries,
                    r.empty,
                    low=r.low,
                    high=r.high,
                )
            )
        out.append(Claim(name, paper, tuple(rows)))
    return tuple(out)


def _roles(task: str, measured: dict) -> dict:
    """Per role feature of the task: the layer-0 heads at '=' with their FCR, best first."""
    roles = {}
    for f in ROLES.get(task, ()):
        hs = [(h, fcr) for h in HEADS[task] if (fcr := measured[(h, 0, f)].fcr) is not None]
        roles[f] = sorted(hs, key=lambda x: -x[1])
    return roles
