"""The ``inversionview`` command line. User errors and bad arguments print one line and exit with status 2.

Only the standard library is imported here: each command imports what it needs (torch, through the model's
modules) when it runs, so that ``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
from pathlib import Path

from . import settings
from .errors import UserError
from .progress import on_terminal
from .settings import ReadSettings, SamplingSettings

log = logging.getLogger(__name__)

SAMPLING = tuple(f.name for f in dataclasses.fields(SamplingSettings))
"""The reading settings that every reading command takes (``--samples`` ... ``--seed``)."""
READING = tuple(f.name for f in dataclasses.fields(ReadSettings))
"""Those of one reading (``query``, ``demo``): ``--chains`` too."""

EXAMPLES = Path(__file__).parent / "configs"
"""Example training configs (TOML) and data files shipped in the package, printed by ``inversionview init``."""

# The paper's counting findings: C1 (after the layer-0 MLP at the target character the count is there),
# C3 (head 0.0 at the target character starts the path) and C2 (head 1.0 at ':' keeps the count, not the letter).
DEMO_QUERIES: dict[str, list[tuple[str, str, int | str]]] = {  # (text, site, position: an index or a token)
    "counting": [
        ("vvzccvczvvvzvcvc|v:8", "x0.post", 18),
        ("vvzccvczvvvzvcvc|v:8", "a0.0", 18),
        ("vvzccvczvvvzvcvc|v:8", "a1.0", ":"),
    ],
    # A1: heads 0.0-0.2 at '=' carry the hundreds digits as a pair; A2: head 0.3 the tens digits;
    # A3: x0.mid at '=' carries the hundreds pair plus the carry from the tens.
    "addition": [("456+378=834", "a0.0", "="), ("456+378=834", "a0.3", "="), ("456+378=834", "x0.mid", "=")],
}
DEMO_INTRO = {
    "counting": (
        "The counting model reads 'letters|target:' and predicts how often the target letter occurs.\n"
        "Each reading samples inputs from the decoder, re-runs the model on them, and sorts them by the distance of\n"
        "their activation to the query's. Samples above the epsilon line are in the preimage: what they share is\n"
        "what the activation encodes. count=N is each sample's true count of its target letter.\n"
    ),
    "addition": (
        "The addition model reads 'a+b=' and writes the sum c. Each reading samples inputs from the decoder, re-runs\n"
        "the model on them, and sorts them by the distance of their activation to the query's. Samples above the\n"
        "epsilon line are in the preimage: what they share is what the activation encodes.\n"
    ),
}


def examples() -> dict[str, Path]:
    """The shipped examples by name: the file name without its extension (counting, ioi-gpt2-small, ...)."""
    return {p.stem: p for p in sorted(EXAMPLES.iterdir()) if p.suffix in (".toml", ".jsonl")}


def cmd_init(args) -> int:
    sys.stdout.write(examples()[args.name].read_text(encoding="utf-8"))
    return 0


def cmd_train_probed(args) -> int:
    if args.steps is not None and args.steps < 1:  # before the imports (torch): bad values answer at once
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    from .tasks import get_task
    from .tasks.training import train_probed

    task = get_task(args.task)
    recipe = {**task.recipe, **({"steps": args.steps} if args.steps is not None else {})}
    info = train_probed(task, args.out, seed=args.seed, command="inversionview " + shlex.join(sys.argv[1:]), **recipe)
    print(f"test accuracy {info['test_accuracy']:.4f} on {info['test_inputs']} held-out inputs; saved to {args.out}")
    return 0


def cmd_train(args) -> int:
    from .train import TrainConfig, train

    cfg = TrainConfig.from_toml(args.config)
    iv = train(cfg, progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from rank 0
        print(f"decoder saved to {iv.run_dir}")
    return 0


def cmd_evaluate(args) -> int:
    _settings(args)
    from .run import InversionView

    res = InversionView.load(args.run, device=args.device).evaluate(args.queries, args.epsilon, args.metric, args.seed)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        for site, h in res["hit"].items():
            print(f"{site:>8}  {h:.3f}")
        print(
            f"{'mean':>8}  {res['mean_hit']:.3f}   (epsilon {res['epsilon']:g}, {res['metric']}, "
            f"{res['queries_per_site']} held-out queries per site, one sample at temperature 1)"
        )
    return 0


def check_limit(args) -> None:
    """Called before the model loads, so that a bad --limit answers at once."""
    if args.limit < 0:
        raise UserError(f"--limit must be 0 or more, got {args.limit}")


def _read(args, iv, site, position):
    kw = dataclasses.asdict(_settings(args, ReadSettings))
    return iv.query(args.text, site=site, position=position, features=getattr(args, "features", None), **kw)


def _load(args):
    """The run of a reading command, read under ``--data`` where given."""
    from .run import InversionView

    iv = InversionView.load(args.run, device=getattr(args, "device", "cpu"))
    if getattr(args, "data", None):
        iv.data = args.data
        iv.dataset()  # a bad data file answers before any reading
    return iv


def cmd_query(args) -> int:
    check_limit(args)
    _settings(args, ReadSettings)
    iv = _load(args)
    pre = _read(args, iv, args.site, args.position)
    _emit(args, [pre])
    return 0


def _emit(args, readings) -> None:
    if args.html:
        from .viewer.html import render_html

        try:
            with open(args.html, "w") as f:
                f.write(render_html(readings))
        except OSError as e:
            raise UserError(f"cannot write the HTML report {args.html}: {e.strerror}") from None
        log.info("wrote %s", args.html)
    if args.json:
        print(json.dumps([p.to_dict() for p in readings] if len(readings) > 1 else readings[0].to_dict()))
    else:
        for p in readings:
            p.show(limit=args.limit)
            print()


def cmd_demo(args) -> int:
    import time

    check_limit(args)
    _settings(args, ReadSettings)
    from .run import InversionView

    t0 = time.time()
    iv = InversionView.load(f"shipped:{args.task}", device=args.device)
    readings = []
    for text, site, position in DEMO_QUERIES[args.task]:
        args.text = text
        readings.append(_read(args, iv, site, position))
    if not args.json:  # after the readings, so that a bad setting prints only its error
        print(DEMO_INTRO[args.task])
    _emit(args, readings)
    if not args.json:
        print(
            f"read {len(readings)} activations of the shipped {args.task} model in {time.time() - t0:.1f} s "
            f"(Auto mix, {args.samples} candidates each). Try: inversionview query shipped:{args.task} "
            f"--text {shlex.quote(text)} --site {site} --position {shlex.quote(str(position))}"
        )
    return 0


def cmd_serve(args) -> int:
    from .viewer.server import make_server

    iv = _load(args)
    server = make_server(
        iv, args.host, args.port, db=args.db, allow_remote=args.allow_remote, allowed_hosts=tuple(args.allowed_host)
    )
    try:
        print(f"InversionView viewer for {iv.run_dir} at {server.url}  (Ctrl-C stops it)", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    print("viewer stopped", flush=True)
    return 0


def cmd_query_batch(args) -> int:
    defaults = _settings(args)
    from .store import ReadingStore, query_batch, read_queries

    iv = _load(args)
    queries = read_queries(args.queries, iv, **dataclasses.asdict(defaults))
    with ReadingStore(args.db, create=True) as store:
        query_batch(iv, store, queries)  # logs the summary
    return 0


def cmd_index(args) -> int:
    """Build the activation cache of a data set at some sites before reading (one shard per torchrun process)."""
    import time

    from .dataset import ActivationIndex, build
    from .distributed import resolve_device, session

    dev = resolve_device(args.device)
    with session(dev) as d:
        iv = _load(args)
        ds = iv.dataset()
        if ds is None:
            raise UserError("index needs a data set: this run has no data file, give --data PATH")
        sites = [iv.site_index(x.strip())[0] for x in args.site.split(",") if x.strip()] if args.site else iv.sites
        for s in sites:
            t0 = time.perf_counter()
            build(iv.probed, s, ds, rank=d.rank, world=d.world, barrier=d.barrier)
            if d.main:
                index = ActivationIndex.open(iv.probed, s, ds)
                print(
                    f"{s.short}: {index.rows:,} activations of {len(ds.texts):,} inputs in {len(index.shards)} "
                    f"shard(s), {index.nbytes / 2**20:.1f} MiB ({index.meta['storage']}) at {index.path}, "
                    f"{time.perf_counter() - t0:.1f} s",
                    flush=True,
                )
    return 0


def cmd_explain(args) -> int:
    from .fcr import explain

    iv = _load(args)
    sites = [x.strip() for x in args.site.split(",") if x.strip()] if args.site else None
    res = explain(iv, sites=sites, queries=args.queries, samples=args.samples, features=args.features, seed=args.seed)
    if args.html or args.png:
        from .viewer.heatmap import plot_explain, render_explain

        if args.html:
            try:
                Path(args.html).write_text(render_explain(res))
            except OSError as e:
                raise UserError(f"cannot write the heat map {args.html}: {e.strerror}") from None
            log.info("wrote %s", args.html)
        if args.png:
            plot_explain(res, args.png)
            log.info("wrote %s", args.png)
    print(json.dumps(res.to_dict(), indent=1) if args.json else res.table())
    return 0


def cmd_reproduce(args) -> int:
    import time

    from .reproduce import reproduce

    t0 = time.time()
    res = reproduce(args.task, queries=args.queries, samples=args.samples, pairs=args.pairs, seed=args.seed)
    if args.json:
        print(json.dumps(res.to_dict(), indent=1))
    else:
        print(res.table())
        print(f"\n{args.task}: {time.time() - t0:.0f} s")
    return 0


def cmd_completeness(args) -> int:
    _settings(args)  # before the imports (torch): bad values answer at once
    from .completeness import scan

    res = scan(
        _load(args),
        args.text,
        args.site,
        args.position,
        samples=args.samples,
        epsilon=args.epsilon,
        metric=args.metric,
        seed=args.seed,
    )
    if args.png:
        res.plot(args.png)
    print(json.dumps(res.to_dict(), indent=1) if args.json else "\n".join(res.lines()))
    if args.png and not args.json:
        print(f"wrote {args.png}")
    return 0


def cmd_patch(args) -> int:
    from .patching import cumulative, load_probed, make_pairs

    probed, task = load_probed(args.model, args.task)
    path = [x for x in args.path.split(",") if x.strip()]
    places = tuple(x.strip() for x in args.places.split(",") if x.strip()) if args.places else None
    res = cumulative(probed, make_pairs(task, args.pairs, args.seed, places=places, answer=args.answer), path)
    print(json.dumps(res.to_dict(), indent=1) if args.json else res.table())
    return 0


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the command line's one-line errors: ``error: ...`` and where to look, exit status 2 (argparse
    itself prints the whole usage first). Subcommands' parsers are made with this class too."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_init(sub) -> None:
    s = sub.add_parser(
        "init", help="print an example training config (or its data file): inversionview init counting > my.toml"
    )
    s.add_argument("name", choices=list(examples()), metavar="NAME", help="the example: " + ", ".join(examples()))
    s.set_defaults(fn=cmd_init)


def _settings_args(s, names: tuple[str, ...] = SAMPLING) -> None:
    """``--NAME`` for each reading setting in ``names``: its type, choices, default and help from the schema
    (:class:`inversionview.settings.ReadSettings`), which checks the values too (:func:`_settings`)."""
    fields = {f.name: f for f in dataclasses.fields(ReadSettings)}
    for name in names:
        f, t = fields[name], settings.hints(ReadSettings)[name]
        rule = f.metadata.get("rule")
        default = "" if f.default is None else f" (default {f.default})"
        s.add_argument(
            f"--{name}",
            type=float if settings.fits(0.5, t) else int if settings.fits(1, t) else str,
            default=f.default,
            choices=rule.choices if rule and rule.choices else None,
            help=settings.summary(ReadSettings, name) + default,
        )


def _settings(args, cls=SamplingSettings):
    """The reading settings among the command's options, checked by the schema (as the Python API checks them),
    before anything loads: a bad value answers at once."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}).checked()


def _query_args(s, text_required: bool = True) -> None:
    """The options of one reading (``query``, ``demo``): the query, the settings, and how to show it."""
    if text_required:
        s.add_argument("--text", required=True, help="the query input (without BOS/EOS)")
        s.add_argument("--site", required=True, help="site: TransformerLens name or short name (a1.0, x0.mid, m1)")
        s.add_argument(
            "--position",
            required=True,
            help="token index (BOS = 0; negative counts back from the last text token) or a token like ':'",
        )
    _settings_args(s, READING)
    if text_required:
        _data_arg(s)
        s.add_argument(
            "--features",
            help="features to measure, separated by commas: built-in names or module:function (default: the task's)",
        )
    s.add_argument("--limit", type=int, default=20, help="samples shown in the terminal")
    s.add_argument("--json", action="store_true", help="print the reading as JSON")
    s.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report")
    _device_arg(s)


def _data_arg(s) -> None:
    s.add_argument(
        "--data",
        metavar="PATH",
        help="read under this data set (a text, JSONL or saved HF data file): its inputs are the input distribution "
        "the shares estimate (default: the run's own data file, or its task's generator)",
    )


def _device_arg(s) -> None:
    s.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")


def _run_arg(s) -> None:
    s.add_argument("run", help="run directory, or shipped:counting")


def add_demo(sub) -> None:
    s = sub.add_parser("demo", help="read counting-model activations with the shipped models")
    s.add_argument("task", nargs="?", default="counting", choices=sorted(DEMO_QUERIES))
    _query_args(s, text_required=False)
    s.set_defaults(fn=cmd_demo)


def add_train_probed(sub) -> None:
    s = sub.add_parser("train-probed", help="train a built-in task's probed model")
    s.add_argument("task", help="the task: counting or addition")
    s.add_argument("--out", required=True, help="directory to write the model to")
    s.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the task's recipe)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_train_probed)


def add_train(sub) -> None:
    s = sub.add_parser("train", help="train a decoder from a TOML config (resumes if interrupted)")
    s.add_argument("config", help="the TOML config file (every key: docs/config.md)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_train)


def add_evaluate(sub) -> None:
    s = sub.add_parser("evaluate", help="hit rate per site of a trained decoder")
    _run_arg(s)
    s.add_argument("--queries", type=int, default=256, help="held-out queries per site")
    _settings_args(s, ("epsilon", "metric", "seed"))
    s.add_argument("--json", action="store_true")
    _device_arg(s)
    s.set_defaults(fn=cmd_evaluate)


def add_query(sub) -> None:
    s = sub.add_parser("query", help="read one activation")
    _run_arg(s)
    _query_args(s)
    s.set_defaults(fn=cmd_query)


def add_serve(sub) -> None:
    s = sub.add_parser("serve", help="the live web viewer: query, compare and download readings in a browser")
    _run_arg(s)
    _data_arg(s)
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    s.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only; any other needs --allow-remote)",
    )
    s.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a --host that other machines can reach (the viewer has no authentication)",
    )
    s.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests addressed to this host name (repeatable; loopback names and the "
        "--host address are always answered, any other is refused against DNS rebinding)",
    )
    s.add_argument("--db", metavar="FILE", help="also browse the readings stored in this SQLite file")
    _device_arg(s)
    s.set_defaults(fn=cmd_serve)


def add_query_batch(sub) -> None:
    s = sub.add_parser(
        "query-batch", help="read many queries (JSONL) into a SQLite readings DB; resumes if interrupted"
    )
    _run_arg(s)
    _data_arg(s)
    s.add_argument("queries", help='JSONL file, one query a line: {"text": ..., "site": ..., "position": ...}')
    s.add_argument("--db", required=True, metavar="FILE", help="the SQLite readings DB (created if missing)")
    _settings_args(s)
    _device_arg(s)
    s.set_defaults(fn=cmd_query_batch)


def add_index(sub) -> None:
    s = sub.add_parser(
        "index",
        help="cache a data set's activations at some sites before reading (torchrun: one shard per process)",
    )
    s.add_argument("run", help="run directory, or shipped:counting")
    _data_arg(s)
    s.add_argument("--site", help="sites, separated by commas (default: all the decoder's sites)")
    _device_arg(s)
    s.set_defaults(fn=cmd_index)


def add_explain(sub) -> None:
    s = sub.add_parser("explain", help="which features each site carries: FCRs per site and position (Table 3)")
    _run_arg(s)
    _data_arg(s)
    s.add_argument("--site", help="sites, separated by commas (default: all the decoder's sites)")
    s.add_argument("--queries", type=int, default=16, help="held-out queries per site and position (default 16)")
    s.add_argument("--samples", type=int, default=256, help="candidates per query (default 256)")
    s.add_argument(
        "--features",
        help="features, separated by commas: built-in names or module:function (default: the task's built-ins)",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true", help="print every FCR as JSON")
    s.add_argument("--html", metavar="FILE", help="also write the sites x features heat map as an HTML page")
    s.add_argument("--png", metavar="FILE", help="also write the heat map as a figure (.png or .svg)")
    s.set_defaults(fn=cmd_explain)


def add_reproduce(sub) -> None:
    s = sub.add_parser("reproduce", help="check the paper's claims (C1-C3, A1-A3) on a shipped model")
    s.add_argument("task", help="counting or addition")
    s.add_argument("--queries", type=int, default=64, help="held-out queries per check (default 64)")
    s.add_argument("--samples", type=int, default=256, help="candidates per query (default 256)")
    s.add_argument("--pairs", type=int, default=200, help="contrast pairs for C3's patching (default 200)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_reproduce)


def add_completeness(sub) -> None:
    s = sub.add_parser("completeness", help="scan every input of the task: true preimage, decoder recall, Fig. 11")
    s.add_argument(
        "run", help="run directory, or shipped:addition (addition: all 810,000 inputs; counting: a fixed pool)"
    )
    _data_arg(s)
    s.add_argument("--text", required=True, help="the query input (without BOS/EOS)")
    s.add_argument("--site", required=True, help="site: TransformerLens name or short name (a0.0, x0.mid)")
    s.add_argument("--position", required=True, help="token index (BOS = 0; negative from the end) or a token like '='")
    _settings_args(s, ("samples", "epsilon", "metric", "seed"))
    s.add_argument("--png", metavar="FILE", help="write the distance / log-probability scatter (Fig. 11) as a PNG")
    s.add_argument("--json", action="store_true", help="print the figures as JSON")
    s.set_defaults(fn=cmd_completeness)


def add_patch(sub) -> None:
    s = sub.add_parser("patch", help="cumulative activation patching along a path of components (logit difference)")
    s.add_argument("model", help="shipped:counting, a run directory, or a probed model directory (with --task)")
    s.add_argument(
        "--path",
        required=True,
        help="COMPONENT@POSITION items in path order, separated by commas: a{L}.{H} (head result), embed, "
        "pos_embed; position an index or a token, e.g. a0.0@-3,a1.0@:",
    )
    s.add_argument(
        "--task",
        choices=["counting", "addition"],
        help="the task whose contrast generator makes the pairs (default: the run's or the shipped model's)",
    )
    s.add_argument("--pairs", type=int, default=200, help="random contrast pairs (default 200)")
    s.add_argument("--places", help="addition: digits to resample, some of F1,F2,F3,S1,S2,S3 (default all)")
    s.add_argument("--answer", type=int, default=0, help="addition: which digit of the sum is the answer (default 0)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.set_defaults(fn=cmd_patch)


SUBCOMMANDS = (
    add_init,
    add_demo,
    add_train_probed,
    add_train,
    add_evaluate,
    add_query,
    add_serve,
    add_query_batch,
    add_explain,
    add_index,
    add_reproduce,
    add_completeness,
    add_patch,
)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="inversionview", description="Read the information in a neural network's activations.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not on_terminal():  # progress bars only on a terminal (ours: inversionview.progress; transformers' too)
        _no_hf_progress_bars()
    try:
        rc = args.fn(args)
        sys.stdout.flush()  # a reader that has gone (| head) is met here, not at the interpreter's exit
        return rc
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output has gone (| head): stop quietly, as a killed pipe does
        _quiet_stdout()
        return 141  # 128 + SIGPIPE, what the shell reports for a command that a closed pipe ends


def _no_hf_progress_bars() -> None:
    """No progress bars from transformers and huggingface_hub ("Writing model shards"): they read the variable when
    they are imported, which is later unless this process imported them already."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers.utils.logging" in sys.modules:
        sys.modules["transformers.utils.logging"].disable_progress_bar()


def _quiet_stdout() -> None:
    """Point standard output at /dev/null, so that the interpreter's last flush does not fail again on the closed
    pipe (Python's recipe for SIGPIPE: docs.python.org/3/library/signal.html#note-on-sigpipe)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (captured in a test)
        pass
