"""Where does a testbed read a fact's subject? Causal tracing (ROME's, Meng et al. 2022) on the base
model, to explain why MEMIT's and AlphaEdit's targets are or are not reached (issue 19).

    python benchmarks/bench_trace.py [--testbed DIR] [--requests 64] [--noise 3.0]

For each edit request whose subject spans two tokens or more, P(true answer) by teacher forcing (the
geometric mean of its tokens' probabilities after the prompt) on the base model:

- clean; with Gaussian noise (``--noise`` × the standard deviation of the embedding matrix, seeded per
  request) on the embeddings of all subject tokens, of the last subject token only, of all but the last;
- with all subject tokens noised and, at one block's output, the clean hidden state put back: at the
  last subject token (the site MEMIT writes to), at every subject token, or at the prompt's last token.

The share of the clean probability that a restored site recovers says how much of the fact flows
through it. MEMIT assumes the last subject token at the edited blocks carries the subject's attributes.
Results: ``benchmarks/results/trace-<testbed>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_testbed import cpu_model, default_testbed  # noqa: E402
from common import timed, write_results  # noqa: E402
from crispedit import __version__  # noqa: E402
from crispedit.layers import decoder_blocks  # noqa: E402
from crispedit.memit import subject_tokens  # noqa: E402
from crispedit.model import load_model  # noqa: E402
from crispedit.requests import edit_text, read_requests  # noqa: E402


def answer_probability(model, ids: torch.Tensor, n_prompt: int, hooks: list) -> float:
    """exp(−mean NLL) of the tokens after the prompt, under forward ``hooks`` [(module, fn)]."""
    handles = [m.register_forward_hook(fn) for m, fn in hooks]
    try:
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids[None], use_cache=False).logits[0].double(), -1)
    finally:
        for h in handles:
            h.remove()
    target = ids[n_prompt:]
    return float(logp[n_prompt - 1 : -1].gather(1, target[:, None]).mean().exp())


def _out(output):
    return output[0] if isinstance(output, tuple) else output


def trace(model, tok, requests, noise: float, seed: int = 0) -> dict:
    """Per condition, the mean P(true answer) and its mean share of the clean one (see the docstring)."""
    embed = model.get_input_embeddings()
    sigma = noise * float(embed.weight.detach().std())
    blocks = decoder_blocks(model)[1]
    rows = []
    for i, r in enumerate(requests):
        span = subject_tokens(tok, r.prompt, r.subject)[1]
        if len(span) < 2:
            continue
        n_prompt = len(tok(r.prompt)["input_ids"])
        ids = torch.tensor(tok(edit_text(r.prompt, r.ground_truth))["input_ids"])
        last = n_prompt - 1

        gen = torch.Generator().manual_seed(seed * 100003 + i)  # one draw per request: the same noise in every condition
        z = torch.randn(len(ids), embed.weight.shape[1], generator=gen, dtype=torch.float64) * sigma

        def noised(positions, z=z):
            def fn(mod, args, out):
                out = out.clone()
                out[0, positions] += z[positions].to(out.dtype)
                return out
            return (embed, fn)

        clean_states = []
        hooks = [(b, lambda mod, a, out: clean_states.append(_out(out)[0].detach().clone())) for b in blocks]
        clean = answer_probability(model, ids, n_prompt, hooks)
        row = {"clean": clean, "subject_tokens": len(span),
               "noise_all": answer_probability(model, ids, n_prompt, [noised(span)]),
               "noise_last": answer_probability(model, ids, n_prompt, [noised(span[-1:])]),
               "noise_but_last": answer_probability(model, ids, n_prompt, [noised(span[:-1])])}
        for site, positions in (("last_subject", span[-1:]), ("subject", span), ("last_prompt", [last])):
            row[f"restore_{site}"] = []
            for b, block in enumerate(blocks):
                def put_back(mod, args, out, b=b, positions=positions):
                    x = _out(out).clone()
                    x[0, positions] = clean_states[b][positions].to(x.dtype)
                    return (x, *out[1:]) if isinstance(out, tuple) else x
                row[f"restore_{site}"].append(answer_probability(model, ids, n_prompt, [noised(span), (block, put_back)]))
        rows.append(row)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    out = {"requests": len(rows), "noise_sigma": sigma, "clean": mean([r["clean"] for r in rows])}
    for k in ("noise_all", "noise_last", "noise_but_last"):
        out[k] = mean([r[k] for r in rows])
    for site in ("last_subject", "subject", "last_prompt"):
        per_block = list(zip(*[r[f"restore_{site}"] for r in rows]))
        out[f"restore_{site}"] = [mean(list(p)) for p in per_block]
    # the share of the clean probability a restored site recovers, above the all-noised run, per block
    gap = out["clean"] - out["noise_all"]
    for site in ("last_subject", "subject", "last_prompt"):
        out[f"recovered_{site}"] = [(p - out["noise_all"]) / gap if gap != 0 else None for p in out[f"restore_{site}"]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--testbed", default=None)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--noise", type=float, default=3.0, help="noise scale, in standard deviations of the embeddings")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    testbed = Path(a.testbed) if a.testbed else default_testbed()
    build = json.loads((testbed / "build.json").read_text())
    model, tok = load_model(str(testbed), "cpu", "float32")
    requests = read_requests(testbed / "edit.jsonl")[: a.requests]
    wall, cpu, result = timed(lambda: trace(model, tok, requests, a.noise))
    blocks = (build.get("edit_blocks") or {})
    result = {"version": __version__, "cpu": cpu_model(), "threads": a.threads, "testbed": testbed.name,
              "testbed_sha256": build.get("testbed_sha256"), "edit_blocks": blocks, "noise": a.noise,
              **result, "wall_s": wall, "cpu_s": cpu}
    for site in ("last_subject", "subject", "last_prompt"):
        print(f"restore {site:<13}" + " ".join(f"{x:+.2f}" for x in result[f"recovered_{site}"]))
    print(f"clean {result['clean']:.3f}  noised: all {result['noise_all']:.3f} last {result['noise_last']:.3f} "
          f"but last {result['noise_but_last']:.3f}  ({result['requests']} requests)")
    out = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"trace-{testbed.name}.json"
    print(f"-> {write_results(result, out)}")


if __name__ == "__main__":
    main()
