"""The command line end to end: ``train`` a few steps, ``evaluate`` (text and --json), ``query`` (terminal,
--json and a self-contained --html file), through ``inversionview.cli.main`` and a real subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import user_error, write_config
from inversionview.cli import build_parser, examples, main
from inversionview.propose import AUTO_MIX
from inversionview.run import SHIPPED, InversionView
from inversionview.train import TrainConfig


TEXT = "vvzccvczvvvzvcvc|v:8"
SITES = ["x0.pre", "a0.1", "x1.mid"]


def _cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def _query(run, *extra):
    return ["query", run, "--text", TEXT, "--samples", "48", *extra]


@pytest.fixture(autouse=True)
def _no_colour(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.delenv("FORCE_COLOR", raising=False)


def test_train_then_evaluate_then_query(tmp_path, probed_dir, capsys):
    cfg = write_config(tmp_path, probed_dir, steps=4, sections={"eval": {"every": 2, "checkpoint_every": 2}})
    run = tmp_path / "run"
    rc, out, _ = _cli(capsys, "train", cfg, "--no-progress")
    assert rc == 0
    assert f"decoder saved to {run}" in out
    assert re.search(r"^step 2: mean hit \d\.\d{3}  x0\.pre=\d\.\d\d a0\.1=\d\.\d\d x1\.mid=\d\.\d\d$", out, re.M), out
    assert re.search(r"^step 4: mean hit", out, re.M)
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [2, 4]
    before = (run / "model.safetensors").read_bytes()

    # the same command again: already trained, nothing changes
    rc, out, _ = _cli(capsys, "train", cfg, "--no-progress")
    assert rc == 0 and f"decoder saved to {run}" in out and "step" not in out
    assert (run / "model.safetensors").read_bytes() == before

    rc, out, _ = _cli(capsys, "evaluate", run, "--json", "--queries", "6")
    assert rc == 0
    res = json.loads(out)
    assert list(res["hit"]) == SITES
    assert all(round(h * 6, 6).is_integer() and 0 <= h <= 1 for h in res["hit"].values())
    assert res["mean_hit"] == pytest.approx(sum(res["hit"].values()) / 3)
    assert (res["epsilon"], res["metric"], res["queries_per_site"]) == (0.1, "euclidean", 6)
    assert res == InversionView.load(run).evaluate(6)  # the CLI reports what the API computes

    rc, out, _ = _cli(capsys, *_query(run, "--site", "a0.1", "--position", ":", "--json"))
    assert rc == 0
    d = json.loads(out)
    assert (d["site"], d["site_short"], d["position"], d["text"]) == ("blocks.0.attn.hook_result.1", "a0.1", 19, TEXT)
    assert d["decoder"] == str(run)
    assert d == InversionView.load(run).query(TEXT, site="a0.1", position=":", samples=48).to_dict()


def test_evaluate_text_output(run_dir, capsys):
    rc, out, _ = _cli(capsys, "evaluate", run_dir, "--queries", "4", "--epsilon", "0.3", "--metric", "cosine")
    assert rc == 0
    lines = out.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == SITES + ["mean"]
    hits = [float(ln.split()[1]) for ln in lines[:3]]
    assert float(lines[3].split()[1]) == pytest.approx(sum(hits) / 3, abs=1.5e-3)
    assert "(epsilon 0.3, cosine, 4 held-out queries per site, one sample at temperature 1)" in lines[3]


def test_evaluate_json_is_deterministic_for_a_seed(run_dir, capsys):
    outs = [
        json.loads(_cli(capsys, "evaluate", run_dir, "--json", "--queries", "4", "--seed", "3")[1]) for _ in range(2)
    ]
    assert outs[0] == outs[1]
    assert outs[0]["hit"].keys() == set(SITES)


def test_query_json_reading(run_dir, capsys):
    rc, out, _ = _cli(capsys, *_query(run_dir, "--site", "a0.1", "--position", ":", "--json"))
    assert rc == 0
    d = json.loads(out)
    assert d["tokens"][0] == "B" and d["tokens"][d["position"]] == ":" and d["position"] == 19
    assert d["mode"] == "tl" and d["metric"] == "euclidean" and d["epsilon"] == 0.1
    assert d["annotation"] == "count=8"
    # candidates with a PAD or EOS inside are no inputs: dropped and counted
    assert d["n_candidates"] == 48 and sum(s["count"] for s in d["samples"]) + d["settings"]["dropped"] == 48
    assert d["settings"]["mix"] == [list(m) for m in AUTO_MIX]
    dist = [s["distance"] for s in d["samples"]]
    assert dist == sorted(dist)
    assert d["fraction_inside"] == pytest.approx(sum(s["count"] for s in d["samples"] if s["distance"] <= 0.1) / 48)
    for s in d["samples"]:
        assert s["tokens"][0] == "B"
        finite = [x for x in s["distances"] if x is not None]
        assert s["distance"] == pytest.approx(min(finite), abs=1e-5)
        assert s["distances"][s["position"]] == pytest.approx(s["distance"], abs=1e-5)
        assert len(s["delta"]) in (0, len(s["tokens"]))
    # a head site carries the attention pattern from the query position, over positions 0..19
    assert len(d["attention"]) == 20 and sum(d["attention"]) == pytest.approx(1, abs=1e-3)


def test_query_positions_by_index_negative_index_and_token(run_dir, capsys):
    got = []
    for pos in ("19", "-1", ":"):
        rc, out, _ = _cli(capsys, *_query(run_dir, "--site", "x0.pre", "--position", pos, "--json", "--samples", "8"))
        assert rc == 0
        got.append(json.loads(out)["position"])
    assert got == [19, 20, 19]  # -1 is the last text token (the '8'); EOS is not counted


def test_query_html_file_is_self_contained(run_dir, tmp_path, capsys):
    path = tmp_path / "reading.html"
    rc, out, _ = _cli(capsys, *_query(run_dir, "--site", "x1.mid", "--position", "-1", "--json", "--html", path))
    assert rc == 0
    assert json.loads(out)["site_short"] == "x1.mid"
    html = path.read_text()
    assert html.lstrip().lower().startswith("<!doctype html") or "<html" in html.lower()
    assert "<style" in html
    # nothing loaded from elsewhere: no external scripts, stylesheets, images or fonts
    assert not re.search(r"<script[^>]*\bsrc=", html, re.I)
    assert not re.search(r"<link\b", html, re.I)
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", html, re.I)
    assert not re.search(r"url\(\s*[\"']?(https?:)?//", html, re.I)
    assert "x1.mid" in html and "epsilon" in html


def test_query_terminal_output_has_epsilon_rule(run_dir, capsys):
    rc, out, _ = _cli(
        capsys, *_query(run_dir, "--site", "x0.pre", "--position", ":", "--epsilon", "0.5", "--limit", "12")
    )
    assert rc == 0
    lines = out.rstrip("\n").splitlines()
    assert lines[0] == "site x0.pre (blocks.0.hook_resid_pre), tl activations, euclidean distance, epsilon 0.5"
    assert lines[1].startswith("query  B") and "[:]" in lines[1] and "position 19 ':'" in lines[1]
    assert "count=8" in lines[1]
    assert "\x1b[" not in out  # no colour when NO_COLOR is set / not a terminal
    rule = [i for i, ln in enumerate(lines) if re.fullmatch(r"-{9} epsilon = 0\.5 -{30}", ln)]
    assert len(rule) == 1
    samples = [
        (i, float(m.group(1))) for i, ln in enumerate(lines) if (m := re.match(r"^\s*(\d+\.\d{4})\s+\d+\s+B", ln))
    ]
    assert 0 < len(samples) <= 12
    for i, dist in samples:  # inside epsilon above the rule, outside below it
        assert (dist <= 0.5) == (i < rule[0])
    m = re.search(
        r"^48 candidates, (\d+) distinct among them(?: \(\+(\d+) met by the chains\))?; (\d+) distinct samples "
        r"inside epsilon; true fraction of candidates inside epsilon: [\d.]+%"
        r"(; \d+ dropped \(a BOS, PAD or EOS inside: no input\))?$",
        out,
        re.M,
    )
    assert m and int(m.group(1)) <= 48
    rows = int(m.group(1)) + int(m.group(2) or 0)
    if rows > len(samples):
        assert f"({rows - len(samples)} more distinct samples not shown;" in out


def test_subprocess_query(run_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "inversionview",
            "query",
            str(run_dir),
            "--text",
            TEXT,
            "--site",
            "a0.1",
            "--position",
            ":",
            "--samples",
            "32",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert re.search(r"^-{9} epsilon = 0\.1 -+$", r.stdout, re.M), r.stdout
    assert r.stdout.startswith("site a0.1 (blocks.0.attn.hook_result.1), tl activations")
    assert "attention from the query position: " in r.stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--temperature", "1e308"], "temperature must be positive and at most 1e6"),  # float32 would overflow
        (["--temperature", "nan"], "temperature must be positive and at most 1e6"),
        (["--temperature", "1", "--noise", "inf"], "noise must be between 0 and 1000, got inf"),
        (["--temperature", "1", "--noise", "-0.1"], "noise must be between 0 and 1000, got -0.1"),
        (["--epsilon", "inf"], "epsilon must be positive and finite"),
        (["--limit", "-1"], "--limit must be 0 or more"),
    ],
)
def test_query_refuses_settings_that_cannot_read(run_dir, capsys, extra, message):
    err = user_error(capsys, *_query(run_dir, "--site", "x0.pre", "--position", ":", "--samples", "8", *extra))
    assert message in err, err


# ---------------------------------------------------------------------------------------------- argument errors
def _bad_arguments() -> list[list[str]]:
    """For every subcommand: an unknown option, and each option or positional with a type or choices given a value
    it refuses. Built from the parser, so that a new subcommand or option is covered without editing this test."""
    cases = [[], ["no-such-command"], ["--no-such-option"]]
    for action in build_parser()._actions:
        for name, sub in getattr(action, "choices", None).items() if action.dest == "command" else ():
            cases.append([name, "--no-such-option"])
            for a in sub._actions:
                bad = "no-such-choice" if a.choices else "x1.5" if a.type in (int, float) else None
                if bad is not None:
                    cases.append([name, *a.option_strings[:1], bad])
    return cases


BAD_ARGUMENTS = _bad_arguments()


def test_bad_arguments_cover_every_subcommand():
    named = {argv[0] for argv in BAD_ARGUMENTS if argv and not argv[0].startswith("-")}
    assert {"init", "query", "evaluate", "demo", "train", "serve", "patch", "completeness"} <= named
    assert ["query", "--metric", "no-such-choice"] in BAD_ARGUMENTS and ["query", "--samples", "x1.5"] in BAD_ARGUMENTS


@pytest.mark.parametrize("argv", BAD_ARGUMENTS, ids=" ".join)
def test_every_bad_argument_is_one_line_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and "usage:" not in err, err


def test_metric_typo_names_the_choices(capsys):
    with pytest.raises(SystemExit):
        main(
            ["query", "shipped:counting", "--text", TEXT, "--site", "a1.0", "--position", ":", "--metric", "manhattan"]
        )
    err = capsys.readouterr().err
    assert err == (
        "error: argument --metric: invalid choice: 'manhattan' (choose from 'euclidean', 'cosine') "
        "(see inversionview query --help)\n"
    )


# ---------------------------------------------------------------------------------------------- start-up
HEAVY = ("torch", "transformers", "numpy", "safetensors", "matplotlib", "tqdm")


def _modules_after(argv: list[str]) -> tuple[int, list[str], str]:
    """Run the command line in a fresh interpreter; its exit status, the heavy packages it imported, its stderr."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['inversionview', *{argv!r}]\n"
        "try:\n    runpy.run_module('inversionview', run_name='__main__')\n"
        "except SystemExit as e:\n    status = e.code\n"
        f"print(status, sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    status, mods = r.stdout.strip().splitlines()[-1].split(" ", 1)
    return int(status), json.loads(mods.replace("'", '"')), r.stderr


@pytest.mark.parametrize(
    "argv, status",
    [
        (["--help"], 0),
        (["query", "--help"], 0),
        (["init", "counting"], 0),
        (["query", "run", "--metric", "manhattan"], 2),
        ([], 2),
        (["query", "shipped:counting", "--text", TEXT, "--site", "a1.0", "--position", ":", "--limit", "-1"], 2),
        (["demo", "--limit", "-1"], 2),
        (["train-probed", "counting", "--out", "m", "--steps", "0"], 2),
        (
            [
                "completeness",
                "shipped:addition",
                "--text",
                "1+1=2",
                "--site",
                "a0.0",
                "--position",
                "=",
                "--samples",
                "0",
            ],
            2,
        ),
    ],
)
def test_help_and_argument_errors_do_not_import_torch(argv, status):
    got, heavy, err = _modules_after(argv)
    assert got == status, err
    assert heavy == [], f"{argv} imported {heavy}"


def test_package_imports_torch_only_when_asked():
    code = (
        "import sys, inversionview\n"
        "before = 'torch' in sys.modules\n"
        "from inversionview import InversionView, Preimage, ProbedModel, Sample, Site, UserError, parse_site\n"
        "import inversionview.run, inversionview.preimage\n"
        "assert InversionView is inversionview.run.InversionView and Preimage is inversionview.preimage.Preimage\n"
        "assert set(inversionview.__all__) <= set(dir(inversionview))\n"
        "print(before, 'torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True"]
    import inversionview

    with pytest.raises(AttributeError, match="has no attribute 'NoSuchThing'"):
        inversionview.NoSuchThing  # noqa: B018


# ---------------------------------------------------------------------------------------------- init
@pytest.mark.parametrize("name", sorted(examples()))
def test_init_prints_an_example_that_works_where_it_is_written(name, tmp_path, capsys):
    rc, out, _ = _cli(capsys, "init", name)
    assert rc == 0 and out == examples()[name].read_text()
    path = tmp_path / examples()[name].name
    path.write_text(out)
    if path.suffix == ".jsonl":
        assert all(json.loads(line)["text"] for line in out.splitlines())
        return
    cfg = TrainConfig.from_toml(path)
    assert f"inversionview init {name} > " in out  # the file says how it is made and used
    assert Path(cfg.out).parent.parent == tmp_path  # runs/NAME next to the file, never inside the package
    if cfg.data.path:  # a data file it names is another example, written next to it
        assert Path(cfg.data.path).name in {p.name for p in examples().values()}


@pytest.mark.parametrize("task", ["counting", "addition"])
def test_init_gives_the_config_of_the_shipped_decoder(task, tmp_path, capsys):
    path = tmp_path / "my.toml"
    path.write_text(_cli(capsys, "init", task)[1])
    mine = json.loads(json.dumps(TrainConfig.from_toml(path).to_dict(relative_to=tmp_path)))
    shipped = json.loads((SHIPPED / task / "decoder" / "train.json").read_text())
    common = {(s, k) for s in shipped if isinstance(shipped[s], dict) for k in shipped[s] if k in mine.get(s, {})}
    # the shipped counting decoder was trained with bf16 = true, the addition one with "auto" (bf16 on a CPU with
    # AVX512-BF16); the example says "auto" (float32 on a CPU without bf16)
    assert mine["train"]["bf16"] == "auto" and shipped["train"]["bf16"] in (True, "auto")
    common.discard(("train", "bf16"))
    assert len(common) > 20
    assert {(s, k): mine[s][k] for s, k in common} == {(s, k): shipped[s][k] for s, k in common}


# ---------------------------------------------------------------------------------------------- the built wheel
@pytest.mark.slow
def test_built_wheel_works_outside_the_source_tree(tmp_path):
    """Build the wheel (offline, with this environment's setuptools), install it into a fresh venv that borrows this
    environment's packages (torch, transformers, ...) through a .pth line, and run what the docs show, from a
    directory that holds no source: init, query on the shipped model, the GPT-2 tokenizer, and the files a wheel
    must carry (py.typed, the licenses)."""
    import shutil
    import sysconfig

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    shutil.copytree(root / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pt"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(root / name, src / name)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp_path / "dist", src],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next((tmp_path / "dist").glob("inversionview-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch etc., after the venv's own
    subprocess.run(
        [*pip, "--python", python, "install", "--no-deps", "--no-index", "--ignore-installed", wheel],
        check=True,
        capture_output=True,
        timeout=300,
    )
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1", "NO_COLOR": "1"}

    def run(*argv):
        r = subprocess.run([str(a) for a in argv], cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout

    where = run(python, "-c", "import inversionview, pathlib; print(pathlib.Path(inversionview.__file__).parent)")
    pkg = Path(where.strip())
    assert pkg.is_relative_to(site) and (pkg / "py.typed").is_file()
    licenses = {p.name for p in site.glob("inversionview-*.dist-info/licenses/**/*") if p.is_file()}
    assert {"LICENSE", "LICENSE-GPT2"} <= licenses
    cli = venv / "bin" / "inversionview"
    (work / "counting.toml").write_text(run(cli, "init", "counting"))
    assert 'out = "runs/counting"' in (work / "counting.toml").read_text()
    reading = json.loads(
        run(
            cli,
            "query",
            "shipped:counting",
            "--text",
            TEXT,
            "--site",
            "a1.0",
            "--position",
            ":",
            "--samples",
            "64",
            "--json",
        )
    )
    assert reading["site_short"] == "a1.0" and reading["n_candidates"] == 64
    assert (
        run(
            python,
            "-c",
            "from inversionview.tokenizer import gpt2_tokenizer; print(gpt2_tokenizer().encode('Hello world'))",
        ).strip()
        == "[50256, 15496, 995]"
    )
