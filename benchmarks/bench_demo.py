"""Editing cost on the demo model, and the demo's own time (issue 3, §7).

- editing time of CrispEdit divided by ``ft`` with the same number of steps (threshold 0, so no
  batch is skipped; minimum of REPS interleaved runs; wall and CPU time);
- the statistics pass (100 documents) and its peak memory increase;
- ``crispedit demo`` itself, as a user runs it, in a fresh process: wall and CPU time, threads,
  load average before and after.

    python benchmarks/bench_demo.py [--reps 5] [--out benchmarks/results/demo.json]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import reset_peak, timed, vm, write_results  # noqa: E402
from crispedit import __version__  # noqa: E402
from crispedit.curvature import collect  # noqa: E402
from crispedit.demo import CURVATURE_DOCS, MODEL_DIR, demo_requests  # noqa: E402
from crispedit.options import MethodOptions  # noqa: E402
from crispedit.session import EditSession  # noqa: E402
from crispedit.layers import find_modules  # noqa: E402
from crispedit.model import load_model  # noqa: E402
from crispedit.world import build_world  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=5, help="epochs per timed edit (10 batches each)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "demo.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load_model(str(MODEL_DIR), "cpu", "float32")
    modules = find_modules(model, "auto")
    world = build_world()
    requests, _ = demo_requests(300, 0)
    corpus = [tok(t)["input_ids"] for t in world.train_documents[:CURVATURE_DOCS]]

    rss0 = reset_peak()
    stats_wall, stats_cpu, stats = timed(lambda: collect(model, modules, corpus, labels="sampled"))
    stats_peak = vm("VmHWM") - rss0
    times: dict[str, list] = {"crispedit": [], "ft": []}
    steps = {}
    for _ in range(a.reps):
        for method in ("crispedit", "ft"):
            options = MethodOptions(method=method, gamma=0.8 if method == "crispedit" else None, epochs=a.epochs,
                                    loss_threshold=0.0)
            session = EditSession.start(model, tok, modules, options, stats)
            session.rebuild()  # the eigendecompositions, once per session: not part of the timed editing
            w, c, record = timed(lambda: session.edit(requests))
            times[method].append((w, c))
            steps[method] = record["steps"]
            session.restore_base()
    assert steps["crispedit"] == steps["ft"]
    best = {m: (min(t[0] for t in v), min(t[1] for t in v)) for m, v in times.items()}

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        w0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "crispedit.cli", "demo", "--threads", str(a.threads), "--out", tmp],
                       check=True, capture_output=True)
        demo_wall = time.perf_counter() - w0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    demo_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    results = {
        "version": __version__, "torch": torch.__version__, "cpus": os.cpu_count(), "threads": a.threads,
        "model_parameters": sum(p.numel() for p in model.parameters()), "layers": list(modules),
        "statistics": {"documents": len(corpus), "tokens": stats.meta["tokens"], "wall_s": stats_wall, "cpu_s": stats_cpu,
                       "peak_rss_increase_mib": stats_peak},
        "edit": {"requests": len(requests), "steps": steps["ft"], "reps": a.reps,
                 "crispedit_s": {"wall": best["crispedit"][0], "cpu": best["crispedit"][1]},
                 "ft_s": {"wall": best["ft"][0], "cpu": best["ft"][1]},
                 "ratio": {"wall": best["crispedit"][0] / best["ft"][0], "cpu": best["crispedit"][1] / best["ft"][1]}},
        "demo": {"wall_s": demo_wall, "cpu_s": demo_cpu, "threads": a.threads, "loadavg_before": load_before,
                 "loadavg_after": os.getloadavg(), "command": f"crispedit demo --threads {a.threads}"},
        "peak_rss_mib_this_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    out = write_results(results, a.out)
    e = results["edit"]
    print(f"editing {e['requests']} requests, {e['steps']} steps: CrispEdit / ft = {e['ratio']['wall']:.3f} wall, "
          f"{e['ratio']['cpu']:.3f} CPU (CrispEdit {e['crispedit_s']['wall']:.2f} s, ft {e['ft_s']['wall']:.2f} s)")
    s = results["statistics"]
    print(f"statistics: {s['tokens']:,} tokens in {s['wall_s']:.2f} s wall ({s['cpu_s']:.2f} s CPU), "
          f"peak RSS +{s['peak_rss_increase_mib']:.0f} MiB")
    d = results["demo"]
    print(f"crispedit demo: {d['wall_s']:.1f} s wall, {d['cpu_s']:.1f} s CPU, {d['threads']} threads, "
          f"load average before {d['loadavg_before'][0]:.2f}")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
