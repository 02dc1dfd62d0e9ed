"""Start-up time of the ``inversionview`` command: how long ``--help``, an argument error and ``init`` take to
answer (none of them needs torch), against the time to import torch and the time a command that does use the
model (``query --help`` is parsed before any import; ``import inversionview.run`` pulls in torch) would pay.

Each figure is the best of a few fresh interpreter runs (``python -m inversionview ...``), wall time.
Target: --help and argument errors well under 1 s.

    python benchmarks/bench_startup.py [REPEAT]
"""

import os
import subprocess
import sys
import time

REPEAT = int(sys.argv[1]) if len(sys.argv) > 1 else 5
ENV = {**os.environ, "NO_COLOR": "1"}

CASES = [
    ("python -c pass (interpreter alone)", ["-c", "pass"]),
    ("inversionview --help", ["-m", "inversionview", "--help"]),
    ("inversionview query --help", ["-m", "inversionview", "query", "--help"]),
    (
        "query --metric manhattan (error)",
        [
            "-m",
            "inversionview",
            "query",
            "x",
            "--text",
            "a",
            "--site",
            "a0.0",
            "--position",
            "1",
            "--metric",
            "manhattan",
        ],
    ),
    ("inversionview init counting", ["-m", "inversionview", "init", "counting"]),
    ("from inversionview import InversionView", ["-c", "from inversionview import InversionView"]),
    ("import torch", ["-c", "import torch"]),
]


def wall(argv) -> tuple[float, int]:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, *argv], capture_output=True, env=ENV)
    return time.perf_counter() - t, r.returncode


def main() -> None:
    print(f"best of {REPEAT} fresh runs, {sys.executable}")
    times = {}
    for name, argv in CASES:
        runs = [wall(argv) for _ in range(REPEAT)]
        times[name] = min(t for t, _ in runs)
        print(
            f"{name:<42} {times[name]:7.3f} s   (exit {runs[-1][1]}; median {sorted(t for t, _ in runs)[REPEAT // 2]:.3f} s)"
        )
    torch_s = times["import torch"]
    for name in ("inversionview --help", "query --metric manhattan (error)"):
        print(f"{name} / import torch: {times[name] / torch_s:.2f}")


if __name__ == "__main__":
    main()
