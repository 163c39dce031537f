"""What an edit will cost before it runs, from the model's configuration alone (``crispedit plan``).

The model is built on the ``meta`` device (shapes, no weights), the edited matrices are found as
``edit`` finds them, and every tensor an edit holds is counted from its shape and dtype:

- **state** (alive from the session's start to the end of the evaluation): the eigenvectors of
  ``A`` and ``G`` (in the masters' precision; the capability eigenbases and the projectors share
  them in a batch edit), their eigenvalues (float64), the projectors' staircases, the float32
  masters of a bf16/fp16 model, Adam's two moments and the session's copy of the base weights;
- **phases**, each a peak above the state alive then: the statistics pass (K-FAC sums of a corpus),
  an edit step (forward and backward of one mini-batch, then the projection and Adam's step), the
  drift report after the edit, and the evaluation (held-out KL, teacher-forced and generated
  answers).

Exact counts: the state, the K-FAC sums and every vocabulary-sized array crispedit itself makes.
Estimates: the activations autograd saves inside the model (a LLaMA-style block: RMSNorm inputs in
float32, queries, keys and values at every query head and the attention output, the three
``intermediate``-wide tensors of a SwiGLU MLP; other architectures are counted with the same
formula) and the lengths of requests and documents (``ASSUMED``). Bytes are counted, not measured:
the CUDA context, cuBLAS workspaces and the allocator's fragmentation come on top.

Flops per optimiser step: ``6 · parameters · tokens`` for the forward and backward of a mini-batch
(the usual count; with frozen weights the backward is cheaper, see ``frozen_backward``) plus the
projection of every edited gradient (``projector.projection_flops``), with the removed ranks
``r_A``, ``r_G`` estimated from gamma (``REMOVED_FRACTIONS``). With ``chunk_size``, steps and the
edits' statistics pass are per chunk, and each step projects twice (the chunked defaults project Adam's
step too). With ``budget`` (``--budget``) the capability budget too, counted from
what ``budget.py`` multiplies and keeps (``budget_flops``: while it holds, a step that cuts, the worst mean
over ``EXACT_EVERY`` steps; ``budget_memory``: its anchor and ``H₀`` in the state, its scratch in the step).

The ledger (``ledger_files``): every file a ledger holds after ``k`` chunks of a CrispEdit history
(``edit --ledger`` with ``--curvature``), by kind: the base tensors, the capability eigendecompositions
``edit`` caches in the ledger directory, the state and request files kept (the current one and, at the
automatic choice of ``ledger.SNAPSHOT_AUTO_BYTES``, one per chunk from chunk 0), the delta, and the JSON.
Tensor files are counted exactly (safetensors' header included, ``safetensors_bytes``); the JSON text is
estimated (``LEDGER_JSON``, ``ASSUMED["request_line_bytes"]``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from .model import ModelError, check_sizes, load_config, one_line, resolve_dtype
from .options import CHUNKED_DEFAULTS, projections_per_step

# Lengths the plan assumes (tokens after the tokenizer, BOS included).
ASSUMED = {
    "batch_size": 32,  # requests per mini-batch (MethodOptions.batch_size)
    # CounterFact prompt + " " + target: 40 characters on average, 63 for the longest of a batch of 32
    # (the first 3,000 records of counterfact-edit-8k); ~4 characters per LLaMA-3 token, plus BOS,
    # rounded up: a padded mini-batch is 32 × 20 tokens.
    "edit_tokens": 20,
    "statistics_documents": 8,  # documents per forward pass of the statistics (collect's batch_size)
    "document_tokens": 512,  # --max-length: capability and held-out documents, padded to the longest
    "eval_batch": 64,  # prompts per generation / teacher-forced batch (evaluate's batch_size)
    "prompt_tokens": 20,  # an evaluation prompt (rephrases and neighbours are a little longer than prompts)
    "new_tokens": 50,  # evaluate.MAX_NEW_TOKENS
    "drift_documents": 8,  # documents per forward pass of text_drift
    "epochs": 25,  # the most epochs of a chunk (MethodOptions.epochs)
    # capability documents whose token ids a ledger keeps: none with edit --curvature (what the plan counts);
    # edit --corpus keeps its --max-documents documents (100), up to --max-length tokens each (512)
    "corpus_documents": 0,
    "corpus_tokens": 0,
    # a line of requests-K.jsonl: 316 bytes on average over the first 3,000 records of counterfact-edit-8k
    # (prompt, target, subject, true answer, one rephrase, one neighbour, case id)
    "request_line_bytes": 316,
    # edits rehearsed per chunk after the first, as a share of the chunk: 903 over chunks 2-30 of 100 on the
    # CounterFact testbed with the chunked defaults, gamma 0.95 (benchmarks/results/testbed-sequential.json,
    # "confirmed"; 1,192 at gamma 0.8)
    "rehearsed_share": 0.31,
}

# The JSON text of a ledger, estimated (bytes; fitted on ledgers of 1 and 2 modules, 2 and 4 chunks, of the tiny
# test LLaMA, with evaluation): ledger.json is a fixed part (identity, the statistics' metadata) plus the method
# options, per chunk record (steps, losses, times, the evaluation; its drift per module) and per state entry (the
# current state and every snapshot: file names, hashes, the optimiser's steps per module). Module names count on
# top, once per part that names them. manifest.json: a fixed part, the options and the module names.
LEDGER_JSON = {"fixed": 2080, "chunk": 1250, "chunk_per_module": 160, "entry": 600, "entry_per_module": 16,
               # with the chunked defaults (rehearsal, a capability-share floor): per chunk, the floored share and
               # the check's time; per chunk after the first, the rehearsal record and one line per rehearsed edit
               "chunk_defaults": 85, "rehearsal": 127, "rehearsed_edit": 22}
MANIFEST_JSON = {"fixed": 490, "per_module": 8}

# r_A / d_in and r_G / d_out (the corner of removed coordinates) per gamma, measured on the
# stories260K and demo models' statistics (benchmarks/results/projection.json, "fractions"); the
# plan takes the larger of the two and interpolates linearly in gamma (0 removes nothing).
REMOVED_FRACTIONS = {
    "stories260K": {0.5: (0.3313953488372093, 1.0), 0.8: (0.8023255813953488, 1.0), 0.9: (0.9767441860465116, 1.0),
                    0.99: (1.0, 1.0)},
    "demo": {0.5: (0.08854166666666667, 0.6015625), 0.8: (0.3619791666666667, 1.0), 0.9: (0.6432291666666666, 1.0),
             0.99: (1.0, 1.0)},
}

GB = 1e9


# ---------------------------------------------------------------------------------------------
# the model, from its configuration


def read_config(model: str):
    """The configuration of a hub id, a model directory or a ``config.json`` file (nothing else is read)."""
    path = Path(model).expanduser()
    if path.is_file():
        from transformers import AutoConfig

        try:
            data = json.loads(path.read_text())
            config = AutoConfig.for_model(data.pop("model_type"), **data)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(f"--model {model}: not a model configuration ({e})") from None
        check_sizes(config, f"--model {model}")
        return config
    return load_config(model)


def meta_model(config, dtype):
    """The model with every tensor on the ``meta`` device: shapes and dtypes, no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _dims(config, model) -> dict:
    """Widths the activation estimate needs, from the configuration (GPT-2 names as a fallback)."""
    def get(*keys, default=None):
        return next((getattr(config, k) for k in keys if getattr(config, k, None)), default)

    hidden = get("hidden_size", "n_embd", "d_model")
    heads = get("num_attention_heads", "n_head")
    out = model.get_output_embeddings()
    return {
        "hidden": hidden,
        "intermediate": get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
        "layers": get("num_hidden_layers", "n_layer"),
        "heads": heads,
        "kv_heads": get("num_key_value_heads", default=heads),
        "head_dim": get("head_dim", default=hidden // heads),
        "vocab": out.weight.shape[0] if out is not None else config.vocab_size,
    }


def _block_index(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix + "."):
        return None
    head = name[len(prefix) + 1 :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


# ---------------------------------------------------------------------------------------------
# counting


def _sizes(dtype) -> tuple[int, int, int]:
    """Bytes per element of the weights, the masters (and eigenvectors, Adam) and ΔW."""
    import torch

    from .editor import master_dtype
    from .saving import delta_dtype

    item = lambda dt: torch.empty((), dtype=dt).element_size()  # noqa: E731
    return item(dtype), item(master_dtype(dtype)), item(delta_dtype(dtype))


def _fractions(gamma: float) -> tuple[float, float]:
    """``(r_A/d_in, r_G/d_out)`` at ``gamma``: the larger of the measured models, linear in gamma."""
    best = (0.0, 0.0)
    for table in REMOVED_FRACTIONS.values():
        points = [(0.0, (0.0, 0.0))] + sorted(table.items())
        if gamma >= points[-1][0]:
            f = points[-1][1]
        else:
            (g0, f0), (g1, f1) = next((a, b) for a, b in zip(points, points[1:]) if a[0] <= gamma <= b[0])
            t = (gamma - g0) / (g1 - g0)
            f = tuple(x0 + t * (x1 - x0) for x0, x1 in zip(f0, f1))
        best = (max(best[0], f[0]), max(best[1], f[1]))
    return best


def _moment(parts: dict[str, int]) -> dict:
    return {"parts": parts, "bytes": sum(parts.values())}


def _phase(state: int, moments: dict[str, dict[str, int]], note: str) -> dict:
    """A phase: its transient moments (parts alive at once) over the state alive then."""
    ms = {k: _moment(v) for k, v in moments.items()}
    worst = max(ms, key=lambda k: ms[k]["bytes"])
    return {"state": state, "moments": ms, "worst": worst, "peak": state + ms[worst]["bytes"], "note": note}


def plan(model: str, layers: str = "auto", module: str | None = None, dtype: str = "float32", requests: int = 3000,
         gamma: float = 0.8, *, chunk_size: int | None = None, device: str = "cuda", assumed: dict | None = None,
         budget: float | None = None) -> dict:
    """Memory per part and per phase, flops per optimiser step and ledger sizes of editing ``model``
    (see the module docstring); ``chunk_size``: requests per chunk (None: one batch). ``device``:
    ``cuda`` (foreach Adam, host memory apart) or ``cpu`` (one-tensor-at-a-time Adam; host and device
    are the same memory). ``assumed`` overrides entries of ``ASSUMED``. ``budget`` (``--budget``, nats per
    token): count the capability budget's flops and memory too (``budget.budget_flops``, ``budget_memory``).
    Bytes throughout; nothing is downloaded but a hub id's configuration."""
    import torch

    from .curvature import SLICE_POSITIONS
    from .evaluate import DRIFT_POSITIONS
    from .layers import MLP_OUTPUT, decoder_blocks, find_modules, parse_layers, weight_shape
    from .projector import EIGH_FLOAT64_MAX_DIM, projection_flops

    def eigh_bytes(n: int) -> int:  # eigh_factor: float64 up to EIGH_FLOAT64_MAX_DIM rows, float32 above
        return 8 if n <= EIGH_FLOAT64_MAX_DIM else 4

    a = {**ASSUMED, **(assumed or {})}
    if not 0.0 <= gamma < 1.0:
        raise ModelError(f"--gamma must lie in [0, 1), got {gamma}")
    config = read_config(model)
    torch_dtype = resolve_dtype(dtype)
    try:
        net = meta_model(config, torch_dtype)
    except Exception as e:  # transformers and torch raise their own types for a configuration they cannot build
        raise ModelError(f"--model {model}: cannot build the model from its configuration ({one_line(e)})") from None
    modules = find_modules(net, parse_layers(layers), module)
    shapes = {n: weight_shape(m) for n, m in modules.items()}
    d = _dims(config, net)
    b, m, bd = _sizes(torch_dtype)  # weights, masters/eigenvectors/Adam, ΔW
    V, h, I, L = d["vocab"], d["hidden"], d["intermediate"], d["layers"]
    params = sum(p.numel() for p in net.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in net.parameters()) + \
        sum(x.numel() * x.element_size() for x in net.buffers())
    W = sum(o * i for o, i in shapes.values())  # edited weights, elements
    biggest = max(o * i for o, i in shapes.values())
    factors = sum(i * i + o * o for o, i in shapes.values())  # elements of all A and G
    prefix, _ = decoder_blocks(net)
    first = min((_block_index(n, prefix) for n in modules if _block_index(n, prefix) is not None), default=0)
    mlp_output = module is None or module == MLP_OUTPUT.get(config.model_type)

    # --- the state: alive from the session's start to the end of the evaluation
    state = {
        "eigenvectors": factors * m,  # U_A, U_G per matrix; cap_eig and the projectors share them in a batch edit
        "eigenvalues": sum(n * eigh_bytes(n) for o, i in shapes.values() for n in (i, o)),  # in eigh's dtype
        "projector_staircases": sum(i for o, i in shapes.values()) * 8,  # removed rows per column, int64
        "masters": W * 4 if b < 4 else 0,  # float32 copies of bf16/fp16 weights (else the weight is its own)
        "adam_moments": 2 * W * m,  # exp_avg, exp_avg_sq in the masters' dtype
        "base_copy": W * b,  # session.base (the evaluation's base weights are the same tensors)
    }
    budget_bytes = None
    if budget is not None:  # --budget: its anchor, H₀ and their views, kept between steps (budget.budget_memory)
        from .budget import budget_memory

        budget_bytes = budget_memory(list(shapes.values()), b, m, m)
        state["budget"] = budget_bytes["anchor"] + budget_bytes["H"] + budget_bytes["views"]
    state_bytes = sum(state.values())

    # --- activations autograd saves, per token (estimate: a LLaMA-style block)
    block = 2 * h * 4 + 4 * d["heads"] * d["head_dim"] * b + 3 * I * b
    full_blocks = L - first - (1 if mlp_output else 0)  # blocks after the first edited one (and it, for another module)
    edited_inputs = sum(i for o, i in shapes.values()) * b  # each edited matrix's input, for its weight gradient
    path = full_blocks * block + h * 4  # + the final norm's float32 input
    scratch_per_token = 3 * I * b + 3 * h * 4  # a no-grad forward: the MLP's widest moment, norms in float32
    logits_f32 = max(4, b)

    # --- statistics pass (collect: capability corpus, or an edited chunk's texts when it is flushed)
    Ns = a["statistics_documents"] * a["document_tokens"]
    sums = factors * 4  # K-FAC sums, float32, on the edited matrices' device
    stats_phase = _phase(0, {
        "batch": {"sums": sums, "activations": Ns * path, "logits": Ns * V * b, "backward_vector": Ns * V * b,
                  "probability_slices": 2 * min(SLICE_POSITIONS, Ns) * V * 4,
                  "backward_scratch": Ns * scratch_per_token},  # a block's gradients on the way back
        "normalising": {"sums": sums, "normalised_copy": sums},  # collect returns A_sum / N, G_sum / N as new tensors
    }, f"{a['statistics_documents']} documents × {a['document_tokens']} tokens per forward; nothing of the edit alive")

    # --- the session's start: the capability eigendecompositions, on the edited matrices' device, in
    # float64 up to EIGH_FLOAT64_MAX_DIM rows (float32 above, then checked); the largest factor's moment,
    # with every other eigenbasis and the base copy already there (the masters come after)
    n_big = max(n for o, i in shapes.values() for n in (i, o))
    e = eigh_bytes(n_big)
    # the symmetrised copy, the vectors and LAPACK's 2n² workspace (estimate: dsyevd's); float32 adds the check
    eigh_scratch = (4 * e if e == 8 else 5 * e) * n_big * n_big
    eig_phase = _phase(state["base_copy"] + state["eigenvectors"] + state["eigenvalues"] - n_big * n_big * m, {
        "eigh": {"factor": 4 * n_big * n_big, "eigh_scratch": eigh_scratch},
    }, f"the largest factor ({n_big} rows) in {'float64' if e == 8 else 'float32'}; before the masters")

    # --- the projectors' build before the first step (energy_threshold: every product alpha_i beta_j in
    # float64, sorted with its int64 indices, cumulated; then the removed ones): no Adam moments yet
    build_phase = _phase(state_bytes - state["adam_moments"], {
        "energy_rule": {"products_sorted_cumulated": 4 * biggest * 8 + biggest},
    }, "one matrix's d_out·d_in eigenvalue products at a time; before the first step")

    # --- an edit step
    Ne = a["batch_size"] * a["edit_tokens"]
    adam_scratch = W * m if device == "cuda" else 2 * biggest * m  # foreach sqrt of every exp_avg_sq / one tensor's
    # editor.GradientFactors keeps each edited matrix's inputs and output gradients until the next forward
    gradient_factors = Ne * sum(i + o for o, i in shapes.values()) * b
    step_phase = _phase(state_bytes, {
        "forward_backward": {"activations": Ne * (path + edited_inputs),
                             # the log-softmax backward: its output, the incoming and the outgoing gradient
                             "loss_logits": 3 * Ne * V * logits_f32,
                             "backward_scratch": Ne * scratch_per_token, "gradient_factors": gradient_factors},
        # one matrix's upcast gradient and two products of the projection
        "projection": {"master_gradients": W * m, "projection_scratch": 3 * biggest * m,
                       "gradient_factors": gradient_factors},
        "adam_step": {"master_gradients": W * m, "adam_scratch": adam_scratch, "gradient_factors": gradient_factors},
        # --budget after Adam's step (the master gradients are released after it): an exact step at its worst
        **({"budget_step": {"master_gradients": W * m, "gradient_factors": gradient_factors,
                            "budget_scratch": max(budget_bytes["exact_step"], budget_bytes["cut_step"])}}
           if budget_bytes else {}),
    }, f"{a['batch_size']} requests × {a['edit_tokens']} tokens per mini-batch")

    # --- the drift report after the edit (session.drift: one matrix at a time, in the eigenvectors' dtype)
    drift_phase = _phase(state_bytes, {
        "report": {"delta": biggest * bd, "delta_in_eigenvector_dtype": biggest * m, "w0_temporary": biggest * m,
                   "outside_part": biggest * m, "rotations": 2 * biggest * m},
    }, "one matrix at a time: its ΔW (delta dtype and eigenvector dtype), W₀ − ΔW, ΔW − PΔW, two rotations")

    # --- the evaluation (after the edit; before it the Adam moments do not exist yet)
    Nd = a["drift_documents"] * a["document_tokens"]
    Nt = a["eval_batch"] * a["prompt_tokens"]
    kv = a["eval_batch"] * (a["prompt_tokens"] + a["new_tokens"]) * L * 2 * d["kv_heads"] * d["head_dim"] * b
    eval_phase = _phase(state_bytes, {
        "text_drift_forward": {"logits": Nd * V * b, "forward_scratch": Nd * scratch_per_token,
                               "base_logits": Nd * V * b},
        "text_drift_slices": {"logits": 2 * Nd * V * b, "log_probability_slices": 3 * min(DRIFT_POSITIONS, Nd) * V * 4},
        "teacher_forced": {"logits": Nt * V * b, "forward_scratch": Nt * scratch_per_token},
        "generation": {"kv_cache": kv, "last_logits": 2 * a["eval_batch"] * V * 4,
                       "forward_scratch": a["eval_batch"] * a["prompt_tokens"] * scratch_per_token},
    }, f"held-out KL: {a['drift_documents']} documents × {a['document_tokens']} tokens; answers: batches of "
       f"{a['eval_batch']} prompts of {a['prompt_tokens']} tokens, {a['new_tokens']} new tokens")

    phases = {"statistics": stats_phase, "eigendecomposition": eig_phase, "projector_build": build_phase,
              "edit_step": step_phase,
              "drift_report": drift_phase, "evaluation": eval_phase}
    peak = max(phases, key=lambda k: phases[k]["peak"])

    # host memory (the CPU's RAM): what lives there during a GPU run
    host = {
        "statistics_sums": sums,  # the session's raw sums per protected source (capability here)
        "statistics_as_loaded": sums,  # --curvature: the file's factors, held by the caller
    }
    # chunked editing (--chunk-size, several request files, --resume): what a batch edit does not hold
    chunked = {
        "protected_eigenvectors": factors * m,  # after the first chunk: the merged factors' eigenbases beside cap_eig
        "rebuild_transient": factors * m,  # the old projectors' eigenbases while the new ones are built
        "edit_statistics_pass": 2 * sums,  # flush: the edits' sums and collect's normalised copy, over the state
        "ledger_deltas": W * bd,  # ledger.save: session.deltas() on the device
    }

    # --- flops per optimiser step
    fr_A, fr_G = _fractions(gamma)
    proj = {}
    for n, (o, i) in shapes.items():
        r_A, r_G = round(fr_A * i), round(fr_G * o)
        f = projection_flops(o, i, r_G, r_A)
        proj[n] = {"r_A": r_A, "r_G": r_G, "form": "dense" if f["dense"] <= f["corner"] else "corner",
                   "flops": min(f["dense"], f["corner"])}
    embeddings = {id(mod.weight) for mod in net.modules() if isinstance(mod, torch.nn.Embedding)}
    output = net.get_output_embeddings()
    path_params = 0  # parameters the backward passes through: blocks from the first edited one, norm, head
    for n, p in net.named_parameters():
        k = _block_index(n, prefix)
        on = k >= first if k is not None else (id(p) not in embeddings or (output is not None and p is output.weight))
        path_params += p.numel() if on else 0
    fb = 6 * params * Ne
    chunk = min(chunk_size or requests, requests)
    chunk_sizes = [min(chunk, requests - c) for c in range(0, requests, chunk)]
    steps_per_epoch = math.ceil(chunk / a["batch_size"])
    # chunked editing's optimiser (CHUNKED_DEFAULTS) projects Adam's step as well as the gradient
    projections = projections_per_step(CHUNKED_DEFAULTS["optimizer"] if chunk_size is not None else "adam")
    flops = {
        "tokens_per_step": Ne,
        "forward_backward": fb,
        # forward, input gradients from the first edited block on, the edited weights' gradients
        "frozen_backward": 2 * params * Ne + 2 * path_params * Ne + 2 * W * Ne,
        "projection": sum(p["flops"] for p in proj.values()),
        "projection_per_matrix": proj,
        "removed_fractions": {"r_A/d_in": fr_A, "r_G/d_out": fr_G, "estimate": True},
        "projections_per_step": projections,
        "per_step": fb + projections * sum(p["flops"] for p in proj.values()),
        "chunks": len(chunk_sizes), "chunk_size": chunk,
        "steps_per_epoch": steps_per_epoch,  # of a chunk (of the batch without chunk_size)
        "max_steps": sum(math.ceil(c / a["batch_size"]) for c in chunk_sizes) * a["epochs"],
        # after every chunk but the last: the edits' statistics (one forward and backward of its edit texts)
        "statistics_per_chunk": 6 * params * chunk * a["edit_tokens"] if len(chunk_sizes) > 1 else 0,
        # the rehearsal check of the chunked defaults: before each chunk a forward of every earlier edit through
        # the blocks from the first edited one and the head (crispedit.prefix); its states below, on the host
        "rehearsal_check_per_edit": 2 * path_params * a["edit_tokens"],
        "rehearsal_check_total": 2 * path_params * a["edit_tokens"] * sum(sum(chunk_sizes[:k]) for k in range(len(chunk_sizes))),
    }
    if len(chunk_sizes) > 1:
        host["rehearsal_states"] = requests * a["edit_tokens"] * h * b if first > 0 else 0
    if budget is not None:  # --budget: counted from what budget.py multiplies (budget.budget_flops)
        from .budget import EXACT_EVERY, budget_flops

        per = {n: budget_flops(o, i, rounds=b < 4) for n, (o, i) in shapes.items()}
        worst = sum(f["worst"] for f in per.values())
        flops["budget"] = {"eps": budget, "worst": worst, "certified": sum(f["certified"] for f in per.values()),
                           "exact_step": sum(f["exact"] for f in per.values()), "exact_every": EXACT_EVERY,
                           "rounded_weights": b < 4, "worst_over_forward_backward": worst / fb, "per_matrix": per}
        flops["per_step_with_budget"] = flops["per_step"] + worst

    # --- the ledger on disk
    from .ledger import SNAPSHOT_AUTO_BYTES, state_file_bytes

    state_file = state_file_bytes(shapes.values(), torch_dtype)
    one = ledger_files(model, shapes, dtype, chunk_sizes[:1], a)
    every = ledger_files(model, shapes, dtype, chunk_sizes, a)
    ledger = {
        "base": {"capability_sums": sums, "corpus_ids": (a["corpus_tokens"] + a["corpus_documents"]) * 8},
        "corpus_ids_with_corpus": (100 * 512 + 100) * 8,  # edit --corpus: up to 100 documents of 512 tokens
        "per_chunk_state": state_file,
        "delta_file": W * bd,
        "eigendecompositions": one["eigendecompositions"],
        "snapshot_per_chunk": sum(state_file.values()),
        "snapshots_by_default": sum(state_file.values()) < SNAPSHOT_AUTO_BYTES,
        "files_one_chunk": one, "total_one_chunk": sum(one.values()),
        "chunks": len(chunk_sizes), "files_all_chunks": every, "total_all_chunks": sum(every.values()),
    }

    return {
        "model": model, "model_type": config.model_type, "dtype": dtype, "device": device, "parameters": params,
        "dims": d, "modules": {n: list(s) for n, s in shapes.items()}, "requests": requests, "gamma": gamma,
        "chunk_size": chunk_size,
        "assumed": a, "slice_positions": {"statistics": SLICE_POSITIONS, "text_drift": DRIFT_POSITIONS},
        "memory": {
            "model_weights": model_bytes,
            "state": state, "state_total": state_bytes,
            "phases": phases, "peak_phase": peak, "peak_beyond_model": phases[peak]["peak"],
            # a batch edit from a curvature file: every phase but the statistics pass
            "peak_edit_run": max(v["peak"] for k, v in phases.items() if k != "statistics"),
            "host": host, "chunked_extra": chunked,
            # edit --corpus (instead of --curvature): run_edit keeps collect's factors (A_sum/N, G_sum/N) on
            # the device for the whole run, on top of the state
            "corpus_extra": {"statistics_kept_by_run_edit": sums},
        },
        "flops": flops,
        "ledger": ledger,
    }


# ---------------------------------------------------------------------------------------------
# the ledger's files

# safetensors' dtype codes and element sizes, in the order its writer lays the tensors out (then by name)
SAFETENSORS_DTYPES = {"int64": ("I64", 8), "float64": ("F64", 8), "float32": ("F32", 4), "int32": ("I32", 4),
                      "bfloat16": ("BF16", 2), "float16": ("F16", 2)}


def safetensors_bytes(tensors: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> int:
    """The size of a safetensors file of ``tensors`` (name -> (dtype name, shape)) and ``metadata``:
    8 bytes of header length, the JSON header padded with spaces to a multiple of 8, the data."""
    order = list(SAFETENSORS_DTYPES)
    header, at = ({"__metadata__": metadata} if metadata else {}), 0
    for name, (dtype, shape) in sorted(tensors.items(), key=lambda kv: (order.index(kv[1][0]), kv[0])):
        code, size = SAFETENSORS_DTYPES[dtype]
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [at, at + size * math.prod(shape)]}
        at += size * math.prod(shape)
    n = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode())
    return 8 + n + (-n % 8) + at


def _state_tensors(shapes: dict[str, tuple[int, int]], dtype: str, started: bool) -> dict:
    """The tensors of a CrispEdit ledger's state file (see ``ledger.state_file_bytes``): ΔW, the weights
    of a float64 model, float32 masters of a bf16/fp16 model; once a chunk is edited, the edits' sums and
    Adam's moments."""
    m, dd = _dtype_names(dtype)
    out = {}
    for n, (o, i) in shapes.items():
        out[f"delta.{n}"] = (dd, (o, i))
        if dd == dtype:
            out[f"weights.{n}"] = (dtype, (o, i))
        if m != dtype:
            out[f"opt.{n}.master"] = (m, (o, i))
        if started:
            out.update({f"sums.edits.{n}.A": ("float32", (i, i)), f"sums.edits.{n}.G": ("float32", (o, o)),
                        f"opt.{n}.exp_avg": (m, (o, i)), f"opt.{n}.exp_avg_sq": (m, (o, i))})
    return out


def ledger_files(model: str, shapes: dict[str, tuple[int, int]], dtype: str, chunk_sizes: list[int],
                 assumed: dict | None = None) -> dict[str, int]:
    """Bytes per kind of file of a CrispEdit ledger after ``len(chunk_sizes)`` chunks of those sizes
    (see the module docstring): ``shapes`` ``(d_out, d_in)`` per edited matrix, ``dtype`` the model's."""
    import torch

    from .ledger import SNAPSHOT_AUTO_BYTES, state_file_bytes
    from .options import MethodOptions
    from .projector import EIGH_FLOAT64_MAX_DIM

    a = {**ASSUMED, **(assumed or {})}
    k, names = len(chunk_sizes), list(shapes)
    base = {f"sums.capability.{n}.{f}": ("float32", (s, s)) for n, (o, i) in shapes.items() for f, s in (("A", i), ("G", o))}
    base.update({"documents.capability.ids": ("int64", (a["corpus_tokens"],)),
                 "documents.capability.lengths": ("int64", (a["corpus_documents"],))})
    from .editor import master_dtype

    # one cache file per factor: eigenvalues in eigh's dtype (float64 up to EIGH_FLOAT64_MAX_DIM rows, float32
    # above), eigenvectors in the masters' dtype (float32; float64 for a float64 model), as the session uses them
    vec = str(master_dtype(getattr(torch, dtype))).removeprefix("torch.")
    eigen = 0
    for n in (s for o, i in shapes.values() for s in (i, o)):
        e = "float64" if n <= EIGH_FLOAT64_MAX_DIM else "float32"
        eigen += safetensors_bytes({"values": (e, (n,)), "vectors": (vec, (n, n))})
    snapshot = sum(state_file_bytes(shapes.values(), getattr(torch, dtype)).values()) < SNAPSHOT_AUTO_BYTES
    kept = sorted({k, *(range(k + 1) if snapshot else ())})  # the current state and every snapshot
    edited = [sum(chunk_sizes[:j]) for j in range(k + 1)]
    options = len(json.dumps(dataclasses.asdict(MethodOptions()), indent=1))
    name_bytes = sum(len(n) for n in names)
    M = len(names)
    return {
        "base": safetensors_bytes(base),
        "eigendecompositions": eigen,
        "states": sum(safetensors_bytes(_state_tensors(shapes, dtype, j > 0)) for j in kept),
        "requests": sum(edited[j] * a["request_line_bytes"] for j in kept),
        "delta": safetensors_bytes({n: (_dtype_names(dtype)[1], s) for n, s in shapes.items()},
                                   {"crispedit": json.dumps({"modules": names})}),
        "manifest": MANIFEST_JSON["fixed"] + len(model) + options + M * MANIFEST_JSON["per_module"] + name_bytes,
        # the model id: its own entry and twice in the statistics' metadata; the current state is an entry of its own
        "ledger_json": LEDGER_JSON["fixed"] + 3 * len(model) + options + 2 * name_bytes
        + k * (LEDGER_JSON["chunk"] + M * LEDGER_JSON["chunk_per_module"] + name_bytes)
        + (len(kept) + 1) * (LEDGER_JSON["entry"] + M * LEDGER_JSON["entry_per_module"] + name_bytes)
        + k * LEDGER_JSON["chunk_defaults"]
        + round(sum(LEDGER_JSON["rehearsal"] + LEDGER_JSON["rehearsed_edit"] * a["rehearsed_share"] * c
                    for c in chunk_sizes[1:])),
    }


def _dtype_names(dtype: str) -> tuple[str, str]:
    """The masters' and ΔW's dtype names of a model in ``dtype``."""
    import torch

    from .editor import master_dtype
    from .saving import delta_dtype

    name = lambda dt: str(dt).removeprefix("torch.")  # noqa: E731
    return name(master_dtype(getattr(torch, dtype))), name(delta_dtype(getattr(torch, dtype)))


# ---------------------------------------------------------------------------------------------
# printing


def _units(model_bytes: int) -> tuple[float, str]:
    """GB (10⁹ bytes) for real models, MB for the small ones."""
    return (GB, "GB") if model_bytes >= GB else (1e6, "MB")


def print_plan(result: dict) -> None:
    """The plan as tables: memory per part and phase, flops, ledger."""
    r, mem = result, result["memory"]
    scale, unit = _units(mem["model_weights"])
    num = lambda x: f"{x / scale:8.3f}"  # noqa: E731
    listed = lambda parts: ", ".join(f"{k.replace('_', ' ')} {v / scale:.3f}" for k, v in parts.items())  # noqa: E731
    names = list(r["modules"])
    shape = " / ".join(sorted({f"{o}×{i}" for o, i in r["modules"].values()}))
    print(f"plan for {r['model']} ({r['model_type']}, {r['dtype']}, {r['parameters'] / 1e9:.3g} B parameters): "
          f"{len(names)} matrices {shape}")
    for n in names:
        print(f"  {n}")
    print(f"\nmemory in {unit} (10^{9 if unit == 'GB' else 6} bytes) on the {r['device']}, counted from shapes "
          "(activations estimated; the CUDA context and fragmentation come on top)")
    print(f"  {'model weights':<34}{num(mem['model_weights'])}")
    print("  edit state (from the session's start to the end of the evaluation)")
    for k, v in mem["state"].items():
        print(f"    {k.replace('_', ' '):<32}{num(v)}")
    print(f"    {'total':<32}{num(mem['state_total'])}")
    print("  peaks beyond the model weights (the state alive then + the phase's largest moment, marked *)")
    for name, ph in mem["phases"].items():
        print(f"    {name.replace('_', ' '):<32}{num(ph['peak'])}   ({ph['note']})")
        for mname, mo in ph["moments"].items():
            mark = "*" if mname == ph["worst"] else " "
            print(f"      {mark}{mname.replace('_', ' '):<29}{num(mo['bytes'])}   {listed(mo['parts'])}")
    run, worst = mem["peak_edit_run"], mem["peak_phase"].replace("_", " ")
    print(f"  {'edit run with --curvature':<34}{num(run)}   beyond the model; "
          f"{num(run + mem['model_weights']).strip()} with it")
    print(f"  {'with the statistics pass':<34}{num(mem['peak_beyond_model'])}   ({worst}; edit --corpus also keeps "
          f"{mem['corpus_extra']['statistics_kept_by_run_edit'] / scale:.3f} of collect's factors on the device)")
    print(f"  chunked editing adds (not in a batch edit): {listed(mem['chunked_extra'])}")
    print(f"  host memory: {listed(mem['host'])}")
    f = r["flops"]
    fr = f["removed_fractions"]
    print(f"\nflops per optimiser step ({f['tokens_per_step']} tokens: {r['assumed']['batch_size']} requests × "
          f"{r['assumed']['edit_tokens']} tokens, assumed)")
    print(f"  forward + backward (6 · params · tokens)  {f['forward_backward']:.3e}"
          f"   (frozen weights: {f['frozen_backward']:.3e})")
    print(f"  projection (estimate: r_A/d_in {fr['r_A/d_in']:.2f}, r_G/d_out {fr['r_G/d_out']:.2f} at gamma "
          f"{r['gamma']:g})  {f['projection']:.3e}" + (f" × {f['projections_per_step']} (chunked editing projects "
                                                        "Adam's step too)" if f["projections_per_step"] > 1 else ""))
    print(f"  per step                                  {f['per_step']:.3e}")
    if "budget" in f:
        bf = f["budget"]
        print(f"  capability budget (--budget {bf['eps']:g}), worst {bf['worst']:.3e} "
              f"({bf['worst_over_forward_backward']:.1%} of the forward + backward): a cut every step"
              f"{' with its rounding checks' if bf['rounded_weights'] else ''} and an exact step "
              f"({bf['exact_step']:.3e}) every {bf['exact_every']}; {bf['certified']:.3e} while it holds")
        print(f"  per step with the budget                  {f['per_step_with_budget']:.3e}")
    chunks = f"{f['chunks']} chunks of {f['chunk_size']}" if f["chunks"] > 1 else "one batch"
    print(f"  {r['requests']} requests, {chunks}: {f['steps_per_epoch']} steps per epoch, at most {f['max_steps']} steps")
    if f["statistics_per_chunk"]:
        print(f"  the edits' statistics after each chunk    {f['statistics_per_chunk']:.3e}")
        print(f"  the rehearsal check, all chunks           {f['rehearsal_check_total']:.3e} "
              f"({f['rehearsal_check_per_edit']:.3e} per earlier edit and chunk: the blocks from the first edited one)")
    lg = r["ledger"]
    print(f"\nledger on disk (edit --ledger with --curvature, CrispEdit), {unit}")
    print(f"  base tensors (once):     {listed(lg['base'])} (edit --corpus adds up to "
          f"{lg['corpus_ids_with_corpus'] / 1e6:.2f} MB of its documents' token ids)")
    print(f"  eigendecompositions:     {lg['eigendecompositions'] / scale:.3f} (the capability factors' eigh, cached once)")
    print(f"  state per chunk:         {listed(lg['per_chunk_state'])}")
    print(f"  delta.safetensors:       {lg['delta_file'] / scale:.3f}")
    kept = ("kept every chunk by default" if lg["snapshots_by_default"]
            else "none by default (over 256 MiB): --snapshot-every K")
    print(f"  snapshot per chunk:      {lg['snapshot_per_chunk'] / scale:.3f} (a state file; {kept})")
    for what, files, total in (("after one chunk", lg["files_one_chunk"], lg["total_one_chunk"]),
                               (f"after {lg['chunks']} chunks", lg["files_all_chunks"], lg["total_all_chunks"])):
        print(f"  {what + ':':<24} {total / scale:.3f} ({listed(files)})")
        if lg["chunks"] == 1:
            break
