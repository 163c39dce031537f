"""lm-evaluation-harness adapter: the edited model and its base on a local multiple-choice task,
offline, with a tiny model; the base's results cached; one-line errors naming --lm-eval."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
import yaml

from crispedit.lmeval import INSTALL, LMEvalError, compare, parse_task
from models import char_tokenizer, save_tiny_model, tiny_hf

# questions whose right answer is always the first choice; single characters of char_tokenizer
# (no apostrophe: its id 32 lies outside the default tiny vocabulary)
QUESTIONS = [("the letter after " + q, [a, *others]) for q, a, others in [
    ("a is", "b", ["c", "d"]), ("b is", "c", ["d", "e"]), ("c is", "d", ["e", "f"]), ("d is", "e", ["g", "h"]),
    ("e is", "f", ["h", "g"]), ("f is", "g", ["i", "j"]), ("g is", "h", ["k", "j"]), ("h is", "i", ["l", "m"]),
]]


@pytest.fixture()
def harness(monkeypatch, tmp_path):
    """The harness, offline (no Hub access at all), its datasets cache and ours under tmp_path."""
    lm_eval = pytest.importorskip("lm_eval", reason=f"lm-evaluation-harness is not installed ({INSTALL})")
    pytest.importorskip("lm_eval.models.huggingface", reason="the harness's HF model needs accelerate")
    import datasets.config
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return lm_eval


def write_task(folder, name="tiny_letters", dataset_path="json"):
    """A local multiple-choice task reading a local JSONL file (the harness's ``json`` builder)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": 0}) + "\n" for q, c in QUESTIONS))
    task = {"task": name, "dataset_path": dataset_path, "test_split": "test", "output_type": "multiple_choice",
            "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}", "doc_to_choice": "{{choices}}",
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                            for m in ("acc", "acc_norm")],
            "metadata": {"version": 1.0}}
    if dataset_path == "json":
        task["dataset_kwargs"] = {"data_files": {"test": str(data)}, "cache_dir": str(folder / "datasets")}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(task))
    return path


def zeroed_head(model) -> dict:
    """Zero the output matrix in place; returns its base weight. With all logits equal, every choice
    has the same log-likelihood and the harness's argmax takes the first: accuracy exactly 1 here."""
    base = {"lm_head": model.lm_head.weight.detach().clone()}
    model.lm_head.weight.data = torch.zeros_like(base["lm_head"])
    return base


def counting(monkeypatch, lm_eval) -> list:
    calls = []
    run = lm_eval.simple_evaluate

    def counted(*args, **kwargs):
        calls.append(kwargs["tasks"])
        return run(*args, **kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", counted)
    return calls


def test_edit_changes_the_score_and_the_base_is_cached(harness, monkeypatch, tmp_path):
    torch.manual_seed(0)
    task = write_task(tmp_path / "tasks")
    model, tok = tiny_hf("llama", vocab=64, dtype=torch.float32), char_tokenizer()
    base_model = copy.deepcopy(model)
    base_weights = zeroed_head(model)
    calls = counting(monkeypatch, harness)
    state, training = torch.get_rng_state(), model.training

    first = compare(model, tok, [str(task)], base_weights=base_weights, base_id="tiny")
    assert len(calls) == 2 and first["base_cached"] == []
    assert len(first["rows"]) == 1  # one row per task: the first metric the harness reports
    row = first["rows"][0]
    assert (row["task"], row["metric"], row["samples"]) == ("tiny_letters", "acc", len(QUESTIONS))
    assert row["higher_is_better"]
    assert row["edited"] == 1.0 and row["base"] < 1.0 and row["change"] == row["edited"] - row["base"]
    assert first["mean_change"] == row["change"]
    assert set(first["edited"][str(task)]["tiny_letters"]["metrics"]) == {"acc,none", "acc_norm,none"}
    assert json.loads(json.dumps(first)) == first  # goes into the JSON report as it is
    # the model, its mode, the caller's generator and tokenizer are as they were
    assert torch.equal(model.lm_head.weight, torch.zeros_like(model.lm_head.weight)) and model.training == training
    assert torch.equal(torch.get_rng_state(), state) and tok.pad_token is None

    # another edit of the same base: the harness runs on the edited model only; the base's score is the same.
    # A doubled head doubles the logit differences between single-character choices: the base's choices win.
    model.lm_head.weight.data = base_weights["lm_head"] * 2
    second = compare(model, tok, [str(task)], base_weights=base_weights)
    assert len(calls) == 3 and second["base_cached"] == [str(task)]
    assert second["rows"][0]["base"] == row["base"] and second["rows"][0]["edited"] == row["base"]
    # a separate base model with the same weights is the same base: cached too
    model.lm_head.weight.data.zero_()
    third = compare(model, tok, [f"{task}:acc_norm"], base_model=base_model)
    assert len(calls) == 4 and third["base_cached"] == [f"{task}:acc_norm"] and third["rows"][0]["metric"] == "acc_norm"
    # the base scored directly agrees with the cached one
    direct = compare(base_model, tok, [str(task)], base_weights={}, cache_dir=tmp_path / "other")
    assert direct["rows"][0]["edited"] == row["base"] and direct["rows"][0]["change"] == 0.0


def test_limit_limits_and_is_part_of_the_cache_key(harness, monkeypatch, tmp_path):
    task = write_task(tmp_path / "tasks")
    model, tok = tiny_hf("llama", vocab=64, dtype=torch.float32), char_tokenizer()
    base_weights = zeroed_head(model)
    calls = counting(monkeypatch, harness)
    result = compare(model, tok, [str(task)], limit=3, base_weights=base_weights)
    row = result["rows"][0]
    assert row["samples"] == 3 and result["limit"] == 3 and len(calls) == 2
    assert result["base"][str(task)]["tiny_letters"]["samples"] == 3
    assert compare(model, tok, [str(task)], limit=3, base_weights=base_weights)["base_cached"] == [str(task)]
    assert compare(model, tok, [str(task)], limit=4, base_weights=base_weights)["base_cached"] == []


def test_errors_are_one_line_and_name_the_option(harness, tmp_path):
    task = write_task(tmp_path / "tasks")
    model, tok = tiny_hf("llama", vocab=64, dtype=torch.float32), char_tokenizer()
    hub_task = write_task(tmp_path / "hub", "hub_task", dataset_path="crispedit-tests/absent")  # offline: no Hub
    errors = {
        str(tmp_path / "absent.yaml"): "absent.yaml: no such file",
        f"{task}:accuracy": "tiny_letters reports no metric 'accuracy' (it reports acc, acc_norm)",
        str(hub_task): "its data could not be loaded",
    }
    for spec, message in errors.items():
        with pytest.raises(LMEvalError) as e:
            compare(model, tok, [spec], base_weights={})
        assert str(e.value).startswith(f"--lm-eval {spec}: ") and message in str(e.value) and "\n" not in str(e.value)


def test_unknown_task_name(harness, monkeypatch, tmp_path):
    # only the local task is registered: indexing the harness's own ~15k task files takes seconds
    import lm_eval.tasks

    write_task(tmp_path / "tasks")
    local = lm_eval.tasks.TaskManager

    def local_only(include_path=None, include_defaults=True):
        return local(include_path=str(tmp_path / "tasks"), include_defaults=False)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", local_only)
    with pytest.raises(LMEvalError, match=r"^--lm-eval tiny_leters: unknown task \(did you mean tiny_letters\?\)$"):
        compare(tiny_hf("llama", vocab=64), char_tokenizer(), ["tiny_leters"], base_weights={})


def test_missing_harness_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(LMEvalError, match="^--lm-eval needs lm-evaluation-harness") as e:
        compare(tiny_hf("llama", vocab=64), char_tokenizer(), ["mmlu"], base_weights={})
    assert str(e.value).endswith(INSTALL)


def test_task_specs():
    assert (parse_task("arc_challenge").name, parse_task("arc_challenge").metric) == ("arc_challenge", None)
    s = parse_task("gsm8k:exact_match,flexible-extract")
    assert (s.name, s.metric, s.path) == ("gsm8k", "exact_match,flexible-extract", None)
    with pytest.raises(LMEvalError, match="^--lm-eval mmlu:: expected TASK or TASK:METRIC$"):
        parse_task("mmlu:")


def test_cli_evaluate_with_lm_eval(harness, tmp_path, capsys):
    from crispedit.cli import main

    save_tiny_model(tmp_path / "base")
    edited = tiny_hf("llama", layers=3, dtype=torch.float32, std=0.1)
    zeroed_head(edited)
    edited.save_pretrained(tmp_path / "edited")
    char_tokenizer().save_pretrained(tmp_path / "edited")
    requests = tmp_path / "r.jsonl"
    requests.write_text(json.dumps({"prompt": "the cat sat on the", "target_new": "rug", "case_id": 0}) + "\n")
    task = write_task(tmp_path / "tasks")
    argv = ["evaluate", "--model", tmp_path / "edited", "--base", tmp_path / "base", "--requests", requests,
            "--lm-eval", task, "--lm-eval-limit", "5", "--out", tmp_path / "eval.json", "--no-progress"]
    assert main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "eval.json").read_text())["lm_eval"]
    row = report["rows"][0]
    assert row["edited"] == 1.0 and row["samples"] == 5 and "tiny_letters" in out and "mean" in out
    argv[argv.index(task)] = tmp_path / "absent.yaml"
    argv[argv.index(tmp_path / "eval.json")] = tmp_path / "eval2.json"
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--lm-eval " + str(tmp_path / "absent.yaml") + ": no such file") and "\n" not in err
