"""`distill generate`: a teacher LM answers prompts, written as resumable JSONL (tiny random Llama)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))
from tiny_lm import chat_file, llama_dir, prompt_file  # noqa: E402


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return llama_dir(tmp_path_factory.mktemp("gen") / "llama", seed=5)


def spec(teacher: Path, prompts: Path, **changes):
    from distill.tasks.lm_generate import GenerateSpec

    return GenerateSpec(teacher=str(teacher), prompts=prompts, **({"max_new_tokens": 6, "batch_size": 4} | changes))


def run_config(teacher: Path, data: Path, tmp_path: Path, **changes) -> dict:
    """A run on generated data: a student of two of the teacher's layers, no baseline."""
    return {
        "task": "causal_lm",
        "data": {"source": "generated", "path": str(data), "val_fraction": 0.2},
        "teacher": {"kind": "hf", "path": str(teacher)},
        "student": {"from_teacher": {"layers": [0, 3]}},
        "baseline": False,
        "train": {"epochs": 1, "batch_size": 8, "optimizer": "adamw", "lr": 0.01},
        "eval": {"latency_batch_sizes": [1], "latency_repeats": 1},
        "output": {"dir": str(tmp_path / "runs"), "name": "seq"},
    } | changes


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prompt_rows_and_manifest_record_every_setting_and_read_back_as_training_data(teacher, tmp_path):
    from distill.tasks.lm_data import load_lm_data
    from distill.tasks.lm_generate import generate_dataset, manifest_path_for
    from distill.tasks.text_data import TextDataSpec

    prompts = prompt_file(tmp_path / "p.jsonl", count=10)
    out = tmp_path / "gen.jsonl"
    result = generate_dataset(spec(teacher, prompts, samples=2, temperature=1.5, chat=False), out)
    written = rows(out)
    assert result.rows == len(written) and result.prompts == 10
    assert sum(result.dropped.values()) + len(written) == 20  # 10 prompts × 2 samples: kept or counted as dropped
    source = [json.loads(line)["prompt"] for line in prompts.read_text().splitlines()]
    for row in written:
        assert set(row) == {"index", "sample", "line", "prompt", "response", "finish", "new_tokens"}
        assert row["prompt"] == source[row["index"]] and row["line"] == row["index"] + 1
        assert row["finish"] in ("stop", "length") and 0 < row["new_tokens"] <= 6 and row["response"]
    assert [(r["index"], r["sample"]) for r in written] == sorted((r["index"], r["sample"]) for r in written)
    manifest = json.loads(manifest_path_for(out).read_text())
    assert manifest["format"] == "distill-generated" and manifest["prompts_done"] == 10
    assert manifest["settings"]["temperature"] == 1.5 and manifest["settings"]["samples"] == 2
    assert len(manifest["teacher"]["sha256"]) == 64 and len(manifest["prompts"]["sha256"]) == 64
    assert manifest["bytes"] == out.stat().st_size and manifest["rows"] == len(written)
    # the file is training data as it stands: prompt/response rows for data.format prompt_response
    data = load_lm_data(
        TextDataSpec(source="jsonl", path=out, tokenizer=teacher, format="prompt_response", val_fraction=0.2)
    )
    assert len(data.train) + len(data.val) + len(data.test) == len(written)


def test_a_killed_run_resumes_to_the_same_file_as_an_uninterrupted_one(teacher, tmp_path):
    from distill.tasks.lm_generate import generate_dataset, manifest_path_for

    prompts = prompt_file(tmp_path / "p.jsonl", count=10)
    whole = tmp_path / "whole.jsonl"
    generate_dataset(spec(teacher, prompts, samples=2), whole)
    killed = tmp_path / "killed.jsonl"
    generate_dataset(spec(teacher, prompts, samples=2), killed, stop_after=1)  # 4 of 10 prompts
    assert json.loads(manifest_path_for(killed).read_text())["prompts_done"] == 4
    with open(killed, "ab") as handle:  # a batch half-written when the process died
        handle.write(b'{"index": 4, "sample": 0, "prompt": "cut of')
    result = generate_dataset(spec(teacher, prompts, samples=2), killed)
    assert killed.read_bytes() == whole.read_bytes() and result.prompts == 10
    again = generate_dataset(spec(teacher, prompts, samples=2), killed)  # complete: nothing to do
    assert killed.read_bytes() == whole.read_bytes() and again.rows == result.rows


def test_chat_prompts_get_the_template_and_the_answer_is_appended_to_the_conversation(teacher, tmp_path):
    from distill.tasks.hf import resolve_model_dir
    from distill.tasks.lm_generate import Prompt, generate_dataset, prompt_ids, read_prompts
    from distill.tasks.text_data import load_tokenizer

    chats = chat_file(tmp_path / "c.jsonl", count=5)
    prompts = read_prompts(spec(teacher, chats))
    original = json.loads(chats.read_text().splitlines()[0])["messages"]
    assert prompts[0].messages == original[:-1]  # the last assistant answer is the teacher's to write
    tokenizer = load_tokenizer(resolve_model_dir(str(teacher), "teacher"))
    ids = prompt_ids(tokenizer, prompts[0], chat=True)
    assert tokenizer.decode(ids).rstrip().endswith("<|assistant|>")
    plain = prompt_ids(tokenizer, Prompt(1, text="cat dog"), chat=False)
    assert plain == tokenizer("cat dog")["input_ids"]
    out = tmp_path / "chat.jsonl"
    generate_dataset(spec(teacher, chats, temperature=0), out)  # greedy
    for row, line in zip(rows(out), chats.read_text().splitlines(), strict=False):
        messages = json.loads(line)["messages"]
        assert row["messages"][:-1] == messages[:-1] and row["messages"][-1]["role"] == "assistant"
    # trained on, only the teacher's answer counts, not the earlier assistant turn of the prompt
    from distill.tasks.lm_data import load_lm_data
    from distill.tasks.text_data import TextDataSpec

    common = dict(path=out, tokenizer=teacher, val_fraction=0.0, test_fraction=0.2)
    last = load_lm_data(TextDataSpec(source="generated", **common))
    every = load_lm_data(TextDataSpec(source="jsonl", format="chat", **common))
    assert last.info["format"] == "chat" and 0 < int(last.train.mask.sum()) < int(every.train.mask.sum())
    answers = {tuple(r["messages"][-1]["content"].split()) for r in rows(out)}
    for y, mask in zip(last.train.y, last.train.mask, strict=True):
        assert tuple(tokenizer.decode(y[mask.bool()].tolist()).replace("<|end|>", "").split()) in answers


def test_duplicates_empty_and_truncated_responses_are_dropped_and_counted(teacher, tmp_path):
    from distill.tasks.lm_generate import generate_dataset

    prompts = tmp_path / "p.txt"
    prompts.write_text("cat dog\n\negg the\n")
    kept = generate_dataset(spec(teacher, prompts, temperature=1e-4, samples=3, chat=False), tmp_path / "a.jsonl")
    # at a near-zero temperature the three samples of a prompt agree: one row per prompt
    assert kept.rows == 2 and kept.dropped["duplicate"] == 4
    every = generate_dataset(
        spec(teacher, prompts, temperature=1e-4, samples=3, chat=False, dedupe=False), tmp_path / "b.jsonl"
    )
    assert every.rows == 6
    cut = generate_dataset(spec(teacher, prompts, chat=False, drop_truncated=True), tmp_path / "c.jsonl")
    truncated = [r for r in rows(tmp_path / "b.jsonl") if r["finish"] == "length"]
    assert cut.dropped.get("truncated", 0) + cut.rows == 2 and all(r["new_tokens"] == 6 for r in truncated)


def test_bad_input_ends_in_one_line_naming_the_option_or_line(teacher, tmp_path, capsys):
    from distill.cli import main

    prompts = prompt_file(tmp_path / "p.jsonl", count=3)
    base = ["generate", "--teacher", str(teacher), "--prompts", str(prompts), "--max-new-tokens", "4", "--quiet"]
    cases = {
        "--temperature": (["--temperature", "-1"], "--temperature: Input should be greater than or equal to 0"),
        "greedy": (["--temperature", "0", "--samples", "2"], "samples > 1 needs temperature > 0"),
        "--processes": (["--processes", "0"], "--processes must be at least 1"),
        "--signals": (["--signals", "-1"], "--signals: Input should be greater than or equal to 0"),
    }
    for extra, message in cases.values():
        assert main([*base, "--out", str(tmp_path / "x.jsonl"), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "cat"}\n{"text": "dog"}\n')
    assert main(["generate", "--teacher", str(teacher), "--prompts", str(bad), "--out", str(tmp_path / "y.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}, line 2: no prompt text in 'prompt'" in err and err.count("\n") == 1
    assert not (tmp_path / "y.jsonl").exists()  # nothing written
    out = tmp_path / "z.jsonl"
    assert main([*base, "--out", str(out)]) == 0
    changed = [*base[:-3], "--max-new-tokens", "5", "--quiet", "--out", str(out)]  # another setting: not the same run
    assert main(changed) == 2
    assert "was generated with another generation settings" in capsys.readouterr().err
    stranger = tmp_path / "mine.jsonl"
    stranger.write_text("not ours\n")
    assert main([*base, "--out", str(stranger)]) == 2
    assert "has no mine.jsonl.manifest.json" in capsys.readouterr().err and stranger.read_text() == "not ours\n"


def test_a_run_trains_on_generated_data_with_the_loss_on_the_answers_and_refuses_an_unfinished_file(
    teacher, tmp_path, capsys
):

    from distill.cli import main
    from distill.tasks.lm_data import load_lm_data
    from distill.tasks.lm_generate import (
        generate_dataset,
        manifest_path_for,
        read_manifest,
        read_token_shards,
        token_rows,
    )
    from distill.tasks.text_data import TextDataSpec

    prompts = prompt_file(tmp_path / "p.jsonl", count=20)
    out = tmp_path / "gen.jsonl"
    generate_dataset(spec(teacher, prompts, samples=2, chat=False), out)
    data = load_lm_data(TextDataSpec(source="generated", path=out, tokenizer=teacher, val_fraction=0.2))
    assert data.info["format"] == "prompt_response" and len(data.info["generated_by"]["teacher"]["sha256"]) == 64
    # with the teacher's tokenizer the rows are the teacher's own tokens, the loss on its answers only
    assert data.info["generated_by"]["tokens"] == "teacher's"
    written = {
        (tuple(p), tuple(r)) for p, r in token_rows(read_token_shards(out, read_manifest(manifest_path_for(out))))
    }
    assert len(written) == len(rows(out))
    for split in (data.train, data.val, data.test):
        for ids, y, mask in zip(split.x["input_ids"], split.y, split.mask, strict=True):
            start, end = int(mask.nonzero()[0]), int(mask.nonzero()[-1]) + 1
            assert bool(mask[start:end].all())  # one span: the response
            assert (tuple(ids[: start + 1].tolist()), tuple(y[start:end].tolist())) in written
    plain = load_lm_data(
        TextDataSpec(source="jsonl", path=out, tokenizer=teacher, format="prompt_response", val_fraction=0.2)
    )
    assert len(plain.train) == len(data.train)  # the same rows, split alike, as prompt/response text
    config = run_config(teacher, out, tmp_path, distill={"terms": [{"type": "ce"}]})
    path = tmp_path / "seq.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "--quiet"]) == 0
    unfinished = tmp_path / "part.jsonl"
    generate_dataset(spec(teacher, prompts, chat=False), unfinished, stop_after=1)
    config["data"]["path"] = str(unfinished)
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["run", str(path), "--quiet", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "answers 4 of 20 prompts" in err and err.count("\n") == 1


def test_plain_prompts_answered_in_the_chat_template_are_written_and_read_back_as_conversations(teacher, tmp_path):
    from distill.tasks.lm_data import load_lm_data
    from distill.tasks.lm_generate import generate_dataset, manifest_path_for
    from distill.tasks.text_data import TextDataSpec

    prompts = prompt_file(tmp_path / "p.jsonl", count=8)
    out = tmp_path / "gen.jsonl"
    generate_dataset(spec(teacher, prompts, temperature=0), out)  # the tokenizer has a template: it is used
    first, source = rows(out)[0], json.loads(prompts.read_text().splitlines()[0])["prompt"]
    assert first["messages"][0] == {"role": "user", "content": source} and first["messages"][1]["role"] == "assistant"
    assert json.loads(manifest_path_for(out).read_text())["settings"]["chat"] is True  # recorded as resolved
    data = load_lm_data(TextDataSpec(source="generated", path=out, tokenizer=teacher, val_fraction=0.25))
    assert data.info["format"] == "chat"
    # the same run from another spelling of the prompt path resumes (files are known by their digests)
    again = generate_dataset(spec(teacher, tmp_path / ".." / tmp_path.name / "p.jsonl", temperature=0), out)
    assert again.prompts == 8


def test_a_file_mixing_prompts_and_conversations_or_an_output_over_the_prompts_is_refused(teacher, tmp_path):
    from distill.core.errors import DistillError
    from distill.tasks.lm_generate import generate_dataset, read_prompts

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"prompt": "cat"}\n{"messages": [{"role": "user", "content": "dog"}]}\n')
    with pytest.raises(DistillError, match=r"mixed.jsonl, line 2: a conversation among plain prompts"):
        read_prompts(spec(teacher, mixed))
    prompts = prompt_file(tmp_path / "p.jsonl", count=3)
    with pytest.raises(DistillError, match="is the prompt file"):
        generate_dataset(spec(teacher, prompts), prompts, overwrite=True)
    assert len(prompts.read_text().splitlines()) == 3


def _shard_arrays(cache: Path) -> dict[str, dict[str, np.ndarray]]:
    manifest = json.loads((cache / "manifest.json").read_text())
    return {
        split: {
            name.removesuffix(".npy"): np.load(cache / "shards" / record["name"] / name)
            for record in info["shards"]
            for name in record["files"]
        }
        for split, info in manifest["splits"].items()
        if info["shards"]
    }


@pytest.mark.parametrize("padded", [False, True], ids=["vocabulary", "padded-vocabulary"])
def test_logits_stored_while_generating_make_the_cache_the_live_teacher_makes(teacher, tmp_path, padded):
    """``--signals 8``: the teacher's top-8 at every step it wrote; a cache made from them (k = 8,
    and k = 4 with the dropped values moved into the tail) holds what running the teacher over
    the same rows stores, for rows the data cut short too. A model whose embedding matrix is
    padded past the tokenizer (64 rows, 53 tokens) is cut to the tokenizer on both sides."""
    from distill.cache import write_cache
    from distill.cache.generated import generated_signals
    from distill.tasks.hf import HFSpec, load_causal_lm
    from distill.tasks.lm_data import load_lm_data
    from distill.tasks.lm_generate import (
        generate_dataset,
        manifest_path_for,
        read_manifest,
        read_token_shards,
        token_rows,
    )
    from distill.tasks.text_data import TextDataSpec

    if padded:
        teacher = llama_dir(tmp_path / "padded", seed=5, vocab=64)
    prompts = prompt_file(tmp_path / "p.jsonl", count=12)
    out = tmp_path / "gen.jsonl"
    generate_dataset(spec(teacher, prompts, samples=2, temperature=1.5, chat=False, signals=8), out)
    manifest = read_manifest(manifest_path_for(out))
    shards = read_token_shards(out, manifest)
    assert all(int(s["indices"].max()) < 53 for s in shards)  # never a padding row of the embedding matrix
    data = load_lm_data(TextDataSpec(source="generated", path=out, tokenizer=teacher, val_fraction=0.2, max_length=8))
    assert data.info["generated_by"]["signals"] == 8 and data.num_classes == 53
    assert any(len(p) + len(r) > 9 for p, r in token_rows(shards))  # some rows are longer than the data keeps
    stored = generated_signals(out, manifest, data.num_classes, 8)
    model = load_causal_lm(HFSpec(path=str(teacher)), "teacher", vocab=data.num_classes)
    for k in (8, 4):
        live = write_cache(model, data, tmp_path / f"live{k}", identity={"t": 1}, k=k, dtype="float32")
        made = write_cache(stored, data, tmp_path / f"stored{k}", identity={"t": 1}, k=k, dtype="float32")
        a, b = _shard_arrays(live), _shard_arrays(made)
        assert set(a) == set(b) == {"train", "val", "test"}
        for split in a:
            assert np.array_equal(a[split]["mask"], b[split]["mask"]) and a[split]["mask"].sum() > 10
            assert np.mean(a[split]["indices"] == b[split]["indices"]) > 0.99
            # stored as float16 while generating: within its rounding of the tiny model's logits
            assert np.allclose(np.sort(a[split]["values"]), np.sort(b[split]["values"]), atol=2e-3)
            for name in ("logsumexp", "tail") + (("label_logprob",) if split != "train" else ()):
                assert np.allclose(a[split][name], b[split][name], atol=1e-4), (split, name)


def test_a_run_learns_from_stored_signals_without_the_teacher_running(teacher, tmp_path, capsys, monkeypatch):
    """``distill cache`` on generated data takes the stored logits (the teacher never runs), and
    a student cut from the teacher trains from that cache with a token-level term."""
    from distill.cli import main
    from distill.tasks.lm_generate import generate_dataset

    prompts = prompt_file(tmp_path / "p.jsonl", count=16)
    out = tmp_path / "gen.jsonl"
    generate_dataset(spec(teacher, prompts, chat=False, signals=8), out)
    config = run_config(
        teacher, out, tmp_path, cache={"k": 4, "path": str(tmp_path / "teacher-cache")},
        distill={"terms": [{"type": "ce", "weight": 0.5}, {"type": "forward_kl", "weight": 0.5}]},
    )  # fmt: skip
    path = tmp_path / "seq.yaml"
    path.write_text(yaml.safe_dump(config))
    import distill.cache.writer as writer

    def no_teacher(*args, **kwargs):  # the stored logits must be used: running the teacher fails the test
        raise AssertionError("the teacher ran")

    monkeypatch.setattr(writer, "_eval", no_teacher)
    assert main(["cache", str(path), "--quiet"]) == 0
    manifest = json.loads((tmp_path / "teacher-cache" / "manifest.json").read_text())
    assert manifest["signals_from"] == "distill generate" and manifest["k"] == 4 and manifest["label_logprobs"]
    config["teacher"] = {"kind": "cache", "path": str(tmp_path / "teacher-cache")}
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "runs" / "seq" / "metrics.json").read_text())
    assert metrics["teacher_cache"]["k"] == 4 and metrics["models"]["distilled"]["metrics"]["perplexity"] > 1
    assert "No scratch baseline was trained" in (tmp_path / "runs" / "seq" / "report.md").read_text()
    # more logits than were stored: the teacher runs, and says why
    monkeypatch.undo()
    bigger = {"k": 16, "path": str(tmp_path / "bigger")}
    path.write_text(yaml.safe_dump({**config, "teacher": {"kind": "hf", "path": str(teacher)}, "cache": bigger}))
    assert main(["cache", str(path)]) == 0
    assert "stores the teacher's top-8 logits" in capsys.readouterr().out
    assert json.loads((tmp_path / "bigger" / "manifest.json").read_text())["signals_from"] == "teacher"


def test_two_processes_write_the_same_file_as_one(teacher, tmp_path):
    prompts = prompt_file(tmp_path / "p.jsonl", count=18)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    outs = {}
    for processes in (1, 2):
        outs[processes] = tmp_path / f"p{processes}.jsonl"
        command = [sys.executable, "-m", "distill", "generate", "--teacher", str(teacher), "--prompts", str(prompts),
                   "--out", str(outs[processes]), "--max-new-tokens", "6", "--batch-size", "4", "--samples", "2",
                   "--signals", "4", "--processes", str(processes), "--quiet"]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = outs[1], outs[2]
    assert one.read_bytes() == two.read_bytes() and len(rows(one)) > 18
    a, b = (json.loads((p.with_name(p.name + ".manifest.json")).read_text()) for p in (one, two))
    assert a["rows"] == b["rows"] and a["prompts_done"] == b["prompts_done"] == 18
    assert [s["name"] for s in a["token_shards"]] == [s["name"] for s in b["token_shards"]]
    for shard in a["token_shards"]:  # five batches of four prompts: 0, 2, 4 by process 0, 1, 3 by process 1
        for name in shard["files"]:
            x, y = (np.load(p.with_name(p.name + ".tokens") / shard["name"] / name) for p in (one, two))
            assert np.array_equal(x, y) if x.dtype.kind in "iu" else np.allclose(x, y, atol=1e-3), name
    assert not (tmp_path / "p2.jsonl.parts").exists()


def test_parts_finished_out_of_order_before_a_kill_are_merged_on_resume(teacher, tmp_path):
    """Process 1 of 2 finished its batch (prompts 4–7) and process 0 none when the run was
    killed: a single-process rerun appends that part in its place and gives the uninterrupted file."""
    from distill.tasks.lm_generate import generate_dataset, manifest_path_for, parts_dir_for

    prompts = prompt_file(tmp_path / "p.jsonl", count=10)
    whole = tmp_path / "whole.jsonl"
    generate_dataset(spec(teacher, prompts, samples=2, signals=4), whole)
    killed = tmp_path / "killed.jsonl"
    for rank in (0, 1):  # process 0 starts the file and is killed before its first batch
        generate_dataset(spec(teacher, prompts, samples=2, signals=4), killed, rank=rank, world=2,
                         barrier=lambda: None, stop_after=rank)  # fmt: skip
    assert json.loads(manifest_path_for(killed).read_text())["prompts_done"] == 0
    assert sorted(p.name for p in parts_dir_for(killed).iterdir()) == ["b-000000004.json", "b-000000004.jsonl"]
    result = generate_dataset(spec(teacher, prompts, samples=2, signals=4), killed)
    assert killed.read_bytes() == whole.read_bytes() and result.prompts == 10
    assert not parts_dir_for(killed).exists()


def test_a_batch_whose_answers_are_all_dropped_still_stores_its_empty_shard(teacher, tmp_path):
    from distill.tasks.lm_generate import generate_dataset, manifest_path_for, read_manifest

    prompts = tmp_path / "p.txt"
    prompts.write_text("cat dog\negg the\n")
    out = tmp_path / "none.jsonl"  # one new token each, every answer cut off and dropped
    result = generate_dataset(spec(teacher, prompts, chat=False, drop_truncated=True, max_new_tokens=1, signals=4), out)
    manifest = read_manifest(manifest_path_for(out))
    assert result.rows == 0 and manifest["token_shards"][0]["rows"] == 0 and manifest["prompts_done"] == 2
    shard = out.with_name(out.name + ".tokens") / manifest["token_shards"][0]["name"]
    assert np.load(shard / "values.npy").shape == (0, 4) and np.load(shard / "logsumexp.npy").shape == (0,)
