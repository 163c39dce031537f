"""Why does a MEMIT edit whose target is reached not land? One closed-form batch edit on a testbed,
then P(target) per request with the last edited block's output at the subject's last token patched:

- ``base at z``: the base model with that state set to the target value ``z`` (what the target
  optimisation reached, on the plain prompt);
- ``edited``: the edited model as it is (the edit);
- ``base with the edited state``: the base model with only that state taken from the edited model
  (the key written, every other position and block as before the edit);
- ``edited at z``: the edited model with that state set to ``z`` (every other position as edited).

If the written state carries the answer in the base model but not in the edited one, the update's
effect at the other positions is what stops the edit.

    python benchmarks/bench_landing.py --testbed DIR [--n 100] [--blocks 0 1] [--settings unbounded]

Results: ``benchmarks/results/landing-<testbed>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_testbed import CLOSED_FORM_SETTINGS, WIDTH_8B, cpu_model  # noqa: E402
from common import write_results  # noqa: E402
from crispedit import __version__  # noqa: E402
from crispedit.corpus import read_documents  # noqa: E402
from crispedit.curvature import collect  # noqa: E402
from crispedit.evaluate import known_facts_filter  # noqa: E402
from crispedit.layers import decoder_blocks, find_modules  # noqa: E402
from crispedit.memit import MemitConfig, apply_closed_form, subject_hidden, subject_tokens  # noqa: E402
from crispedit.model import load_model  # noqa: E402
from crispedit.requests import EditRequest, read_requests  # noqa: E402


@torch.no_grad()
def target_probability(model, tok, block, request: EditRequest, state: torch.Tensor | None = None) -> float:
    """P(first target token | prompt), with ``block``'s output at the last subject token replaced by
    ``state`` when given."""
    ids, positions = subject_tokens(tok, request.prompt, request.subject)
    target = tok(" " + request.target_new, add_special_tokens=False)["input_ids"][0]

    def patch(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[0, positions[-1]] = state.to(hidden.dtype)
        return output

    handle = block.register_forward_hook(patch) if state is not None else None
    try:
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    finally:
        if handle is not None:
            handle.remove()
    return float(logits.float().softmax(-1)[target])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--testbed", required=True)
    ap.add_argument("--n", type=int, default=100, help="the first N edit-pool requests the base answers")
    ap.add_argument("--blocks", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--settings", default="unbounded", choices=list(CLOSED_FORM_SETTINGS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    testbed = Path(a.testbed).expanduser()
    model, tok = load_model(str(testbed), "cpu", "float32")
    pool = read_requests(testbed / "edit.jsonl")
    known = {r.case_id for r in known_facts_filter(model, tok, [EditRequest(r.prompt, r.ground_truth, case_id=r.case_id) for r in pool])}
    requests = [r for r in pool if r.case_id in known][: a.n]
    modules = find_modules(model, a.blocks)
    docs = read_documents([testbed / "curvature.txt"], tok, max_length=512)
    stats = collect(model, modules, docs, labels="sampled", seed=0)
    C = {n: stats.A[n] for n in modules}  # (per-token means already)
    cfg = dataclasses.replace(MemitConfig(), mom2_update_weight=15000.0 * model.config.intermediate_size / WIDTH_8B,
                              **CLOSED_FORM_SETTINGS[a.settings])
    block = decoder_blocks(model)[1][a.blocks[-1]]
    base_state = {n: m.weight.detach().clone() for n, m in modules.items()}
    result = apply_closed_form(model, tok, modules, requests, C, cfg, "memit", prefixes=[[""]])
    z = result.targets.z
    edited_states = subject_hidden(model, tok, block, requests)  # [n, d_model] float64
    rows = {"edited": [target_probability(model, tok, block, r) for r in requests],
            "edited at z": [target_probability(model, tok, block, r, z[i]) for i, r in enumerate(requests)]}
    for n, m in modules.items():
        m.weight.data.copy_(base_state[n])
    rows["base at z"] = [target_probability(model, tok, block, r, z[i]) for i, r in enumerate(requests)]
    rows["base with the edited state"] = [target_probability(model, tok, block, r, s) for r, s in zip(requests, edited_states)]
    rows["base"] = [target_probability(model, tok, block, r) for r in requests]
    distance = (edited_states - z).norm(dim=1).tolist()
    summary = {k: {"mean": sum(v) / len(v), "share_above_half": sum(p > 0.5 for p in v) / len(v)} for k, v in rows.items()}
    for k, v in summary.items():
        print(f"{k:<28} P(target) {v['mean']:.3f} (> 0.5: {v['share_above_half']:.2f})", flush=True)
    print(f"|edited state - z| {sum(distance) / len(distance):.2f}; |z - h| {result.layers[next(iter(result.layers))]['residual']:.2f}")
    out = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"landing-{testbed.name}.json"
    write_results({"version": __version__, "cpu": cpu_model(), "testbed": testbed.name, "n": len(requests), "blocks": a.blocks,
                   "settings": a.settings, "config": dataclasses.asdict(cfg), "prefixes": "none (the plain prompt)",
                   "summary": summary, "state_distance_to_z_mean": sum(distance) / len(distance),
                   "layers": result.layers, "per_request": [dict(zip(rows, ps)) for ps in zip(*rows.values())]}, out)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
