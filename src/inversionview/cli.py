"""The ``inversionview`` command line. User errors print one line and exit with status 2."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys

from .errors import UserError

log = logging.getLogger(__name__)

# The paper's counting findings: C1 (after the layer-0 MLP at the target character the count is there),
# C3 (head 0.0 at the target character starts the path) and C2 (head 1.0 at ':' keeps the count, not the letter).
DEMO_QUERIES = {"counting": [("vvzccvczvvvzvcvc|v:8", "x0.post", 18), ("vvzccvczvvvzvcvc|v:8", "a0.0", 18),
                             ("vvzccvczvvvzvcvc|v:8", "a1.0", ":")],
                # A1: heads 0.0-0.2 at '=' carry the hundreds digits as a pair; A2: head 0.3 the tens digits;
                # A3: x0.mid at '=' carries the hundreds pair plus the carry from the tens.
                "addition": [("456+378=834", "a0.0", "="), ("456+378=834", "a0.3", "="), ("456+378=834", "x0.mid", "=")]}
DEMO_INTRO = {"counting": (
    "The counting model reads 'letters|target:' and predicts how often the target letter occurs.\n"
    "Each reading samples inputs from the decoder, re-runs the model on them, and sorts them by the distance of\n"
    "their activation to the query's. Samples above the epsilon line are in the preimage: what they share is\n"
    "what the activation encodes. count=N is each sample's true count of its target letter.\n"),
    "addition": (
    "The addition model reads 'a+b=' and writes the sum c. Each reading samples inputs from the decoder, re-runs\n"
    "the model on them, and sorts them by the distance of their activation to the query's. Samples above the\n"
    "epsilon line are in the preimage: what they share is what the activation encodes.\n")}


def cmd_train_probed(args) -> int:
    from .tasks import get_task
    from .tasks.training import train_probed

    task = get_task(args.task)
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    recipe = {**task.recipe, **({"steps": args.steps} if args.steps is not None else {})}
    info = train_probed(task, args.out, seed=args.seed, command="inversionview " + shlex.join(sys.argv[1:]), **recipe)
    print(f"test accuracy {info['test_accuracy']:.4f} on {info['test_inputs']} held-out inputs; saved to {args.out}")
    return 0


def cmd_train(args) -> int:
    from .train import TrainConfig, train

    cfg = TrainConfig.from_toml(args.config)
    iv = train(cfg, progress=not args.no_progress)
    print(f"decoder saved to {iv.run_dir}")
    return 0


def cmd_evaluate(args) -> int:
    from .run import InversionView

    res = InversionView.load(args.run).evaluate(args.queries, args.epsilon, args.metric, args.seed)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        for site, h in res["hit"].items():
            print(f"{site:>8}  {h:.3f}")
        print(f"{'mean':>8}  {res['mean_hit']:.3f}   (epsilon {res['epsilon']:g}, {res['metric']}, "
              f"{res['queries_per_site']} held-out queries per site, one sample at temperature 1)")
    return 0


def _read(args, iv, site, position):
    return iv.query(args.text, site=site, position=position, samples=args.samples, temperature=args.temperature,
                    noise=args.noise, epsilon=args.epsilon, metric=args.metric, seed=args.seed)


def cmd_query(args) -> int:
    from .run import InversionView

    iv = InversionView.load(args.run)
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

    from .run import InversionView

    t0 = time.time()
    iv = InversionView.load(f"shipped:{args.task}")
    if not args.json:
        print(DEMO_INTRO[args.task])
    readings = []
    for text, site, position in DEMO_QUERIES[args.task]:
        args.text = text
        readings.append(_read(args, iv, site, position))
    _emit(args, readings)
    if not args.json:
        print(f"read {len(readings)} activations of the shipped {args.task} model in {time.time() - t0:.1f} s "
              f"(Auto mix, {args.samples} candidates each). Try: inversionview query shipped:{args.task} "
              f"--text {shlex.quote(text)} --site {site} --position {shlex.quote(str(position))}")
    return 0


def _reading_args(s, text_required: bool = True) -> None:
    if text_required:
        s.add_argument("--text", required=True, help="the query input (without BOS/EOS)")
        s.add_argument("--site", required=True, help="site: TransformerLens name or short name (a1.0, x0.mid, m1)")
        s.add_argument("--position", required=True,
                       help="token index (BOS = 0; negative counts back from the last text token) or a token like ':'")
    s.add_argument("--samples", type=int, default=1024, help="candidates to sample (default 1024)")
    s.add_argument("--temperature", type=float, default=None, help="one sampling temperature (default: the Auto mix)")
    s.add_argument("--noise", type=float, default=0.0, help="activation noise eta with --temperature")
    s.add_argument("--epsilon", type=float, default=None, help="preimage radius (default: the run's, 0.1)")
    s.add_argument("--metric", choices=["euclidean", "cosine"], default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--limit", type=int, default=20, help="samples shown in the terminal")
    s.add_argument("--json", action="store_true", help="print the reading as JSON")
    s.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inversionview", description="Read the information in a neural network's activations.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("demo", help="read counting-model activations with the shipped models")
    s.add_argument("task", nargs="?", default="counting", choices=sorted(DEMO_QUERIES))
    _reading_args(s, text_required=False)
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("train-probed", help="train a built-in task's probed model")
    s.add_argument("task", help="the task: counting or addition")
    s.add_argument("--out", required=True, help="directory to write the model to")
    s.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the task's recipe)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_train_probed)

    s = sub.add_parser("train", help="train a decoder from a TOML config (resumes if interrupted)")
    s.add_argument("config", help="the TOML config file")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("evaluate", help="hit rate per site of a trained decoder")
    s.add_argument("run", help="run directory, or shipped:counting")
    s.add_argument("--queries", type=int, default=256, help="held-out queries per site")
    s.add_argument("--epsilon", type=float, default=None)
    s.add_argument("--metric", choices=["euclidean", "cosine"], default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_evaluate)

    s = sub.add_parser("query", help="read one activation")
    s.add_argument("run", help="run directory, or shipped:counting")
    _reading_args(s)
    s.set_defaults(fn=cmd_query)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return args.fn(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
