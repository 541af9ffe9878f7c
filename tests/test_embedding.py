"""Sentence-embedding students: the scores against reference implementations, the embedding terms
against hand-computed values, and a whole run on tiny random BERT encoders."""

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from tiny_text import corpus, teacher_dir  # noqa: E402

from distill.core.errors import DistillError  # noqa: E402
from distill.core.losses import TERMS, Batch, ModelOutputs  # noqa: E402
from distill.tasks.embedding import linear_probe, pair_cosines, recall_at_k, spearman  # noqa: E402


@pytest.fixture(scope="module")
def encoder_path(tmp_path_factory):
    return teacher_dir(tmp_path_factory.mktemp("encoder") / "bert", head=False, layers=4)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    return corpus(tmp_path_factory.mktemp("corpus") / "texts", per_class=30)


def test_spearman_recall_and_probe_match_reference_values():
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, generator=g), torch.randn(200, generator=g)
    b = a + 0.5 * b
    assert spearman(a, b) == pytest.approx(spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-9)
    assert spearman(a, a) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    e = torch.randn(6, 4, generator=g)
    cos = pair_cosines(e)
    assert len(cos) == 15 and cos[0] == pytest.approx(float(F.cosine_similarity(e[0], e[1], dim=0)), abs=1e-6)
    assert recall_at_k(e, e, k=3) == 1.0
    # points on a line: neighbours under the student are the teacher's with the order of 2 and 3 swapped
    teacher = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    assert recall_at_k(student, teacher, k=1) == pytest.approx(0.0)  # every nearest neighbour differs
    labels = torch.tensor([0] * 10 + [1] * 10)
    separable = torch.cat([torch.randn(10, 3, generator=g) + 5, torch.randn(10, 3, generator=g) - 5])
    assert linear_probe(separable, labels) == 1.0
    assert linear_probe(separable, torch.full((20,), -1)) != linear_probe(separable, torch.full((20,), -1))  # NaN


def test_embedding_terms_match_hand_computed_values_and_project_a_smaller_student():
    g = torch.Generator().manual_seed(1)
    s = ModelOutputs(embedding=torch.randn(5, 4, generator=g, requires_grad=True))
    t = ModelOutputs(embedding=torch.randn(5, 4, generator=g))
    batch = Batch(None)
    mse, cosine = TERMS["embed_mse"](), TERMS["embed_cosine"]()
    for term in (mse, cosine):
        term.setup(s, t)
        assert isinstance(term.projection, torch.nn.Identity)
    assert float(mse(s, t, batch).detach()) == pytest.approx(float(((s.embedding - t.embedding) ** 2).mean().detach()))
    expected = (1 - F.cosine_similarity(s.embedding, t.embedding, dim=-1)).mean()
    assert float(cosine(s, t, batch).detach()) == pytest.approx(float(expected.detach()))
    small = ModelOutputs(embedding=torch.randn(5, 2, generator=g))
    projected = TERMS["embed_mse"]()
    projected.setup(small, t)
    assert projected.projection.weight.shape == (4, 2)
    assert float(projected(small, t, batch).detach()) == pytest.approx(
        float(((projected.projection(small.embedding) - t.embedding) ** 2).mean().detach())
    )
    with pytest.raises(DistillError, match="needs the student's and the teacher's embeddings"):
        mse(ModelOutputs(logits=torch.zeros(5, 3)), t, batch)
    # relation terms without taps compare embeddings when there are no logits
    assert float(TERMS["sp"]()(s, t, batch).detach()) > 0


def test_a_pca_projection_reconstructs_teacher_embeddings_from_their_principal_coordinates():
    from distill.core.losses import build_term

    g = torch.Generator().manual_seed(0)
    basis, mean = torch.linalg.qr(torch.randn(8, 3, generator=g))[0], torch.randn(8, generator=g)
    codes = torch.randn(40, 3, generator=g) * torch.tensor([3.0, 2.0, 1.0])
    teacher = ModelOutputs(embedding=codes @ basis.T + mean)  # rank 3 around a mean, in 8 dimensions
    term = build_term("embed_mse", {"init": "pca", "calibration": 40})
    assert term.calibration_samples == 40 and TERMS["embed_mse"]().calibration_samples == 0
    term.setup(ModelOutputs(embedding=torch.zeros(40, 3)), teacher)
    weight, bias = term.projection.weight.detach(), term.projection.bias.detach()
    assert torch.allclose(weight.T @ weight, torch.eye(3), atol=1e-5)  # orthonormal principal directions
    assert torch.allclose(bias, teacher.embedding.mean(0), atol=1e-5)
    student = ModelOutputs(embedding=(teacher.embedding - bias) @ weight)  # the teacher's principal coordinates
    assert float(term(student, teacher, Batch(None)).detach()) < 1e-9  # reconstructed exactly
    random = build_term("embed_mse")
    random.setup(student, teacher)
    assert float(random(student, teacher, Batch(None)).detach()) > 0.1
    with pytest.raises(DistillError, match="a PCA to 3 dimensions needs at least 3 calibration samples, got 2"):
        build_term("embed_cosine", {"init": "pca"}).setup(
            ModelOutputs(embedding=torch.zeros(2, 3)), ModelOutputs(embedding=teacher.embedding[:2])
        )


def test_a_remembered_embedding_teacher_runs_once_and_trains_like_a_live_one(encoder_path, texts):
    """Embedding terms read only the teacher's embedding, which the remembered teacher keeps (the
    pass runs longest texts first; outputs agree with the live teacher's to float precision)."""
    from distill.core.distiller import Distiller
    from distill.core.losses import build_term
    from distill.pipeline.config import TrainSpec
    from distill.tasks import get_task
    from distill.tasks.hf import FromTeacherSpec, HFSpec, cut_student, load_encoder
    from distill.tasks.text_data import TextDataSpec, load_text_data
    from distill.train.loop import train

    data = load_text_data(TextDataSpec(source="text_folder", path=texts, tokenizer=encoder_path, max_length=16))
    task, spec = get_task("text_embedding"), TrainSpec(epochs=2, batch_size=16, lr=0.1)  # SGD: Adam would amplify noise
    students, calls = {}, {}
    for remember in (False, True):
        teacher = load_encoder(HFSpec(path=encoder_path), "teacher")
        student = cut_student(FromTeacherSpec(layers=[1, 3]), teacher, "student")
        calls[remember] = 0
        teacher.register_forward_hook(lambda *_, r=remember: calls.__setitem__(r, calls[r] + 1))
        terms = {"cos": build_term("embed_cosine"), "mse": build_term("embed_mse")}
        distiller = Distiller(student, teacher, terms, example_inputs=task.example_inputs(data))
        train(distiller, data, spec, remember_teacher=remember, task=task, select_best=False)
        students[remember] = student.state_dict()
    steps = -(-len(data.train) // 16)
    # a probe and the validation reference (one batch), then every step, or: a size check and one pass
    assert calls[False] == 2 + 2 * steps and calls[True] == 2 + 1 + steps
    assert all(torch.allclose(students[False][k], students[True][k], atol=1e-5) for k in students[False])


def embedding_config(tmp_path, encoder, texts, **changes):
    import yaml

    config = {
        "task": "text_embedding",
        "data": {"source": "text_folder", "path": str(texts), "max_length": 16},
        "teacher": {"kind": "hf", "path": str(encoder)},
        "student": {"from_teacher": {"layers": [1, 3]}},
        "distill": {"terms": [{"type": "embed_cosine"}, {"type": "embed_mse"}]},
        "train": {"epochs": 2, "batch_size": 16, "optimizer": "adamw", "lr": 0.003, "schedule": "constant"},
        "eval": {"latency_batch_sizes": [1], "latency_repeats": 3},
        "output": {"dir": str(tmp_path / "runs"), "name": "emb"},
    } | changes
    path = tmp_path / "emb.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_an_embedding_run_scores_students_against_the_teacher(encoder_path, texts, tmp_path):
    from distill.cli import main

    assert main(["run", str(embedding_config(tmp_path, encoder_path, texts)), "--quiet"]) == 0
    run = tmp_path / "runs" / "emb"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["primary_metric"] == {"name": "spearman", "higher_is_better": True, "percent": False}
    teacher, student = metrics["models"]["teacher"], metrics["models"]["distilled"]
    assert "scratch" not in metrics["models"]  # nothing to train on alone
    assert teacher["metrics"]["spearman"] == pytest.approx(1.0) and teacher["metrics"]["recall_at_10"] == 1.0
    assert 0.5 < student["score"] < 1.0 and set(student["metrics"]) == {"spearman", "recall_at_10", "linear_probe"}
    assert "test_acc" not in student and "per_class_acc" not in student
    history = metrics["training"]["distilled"]["history"]
    assert history[-1]["terms"]["embed_cosine"] < history[0]["terms"]["embed_cosine"]
    html = (run / "report.html").read_text()
    assert 'id="scores"' in html and 'id="per-class"' not in html
    assert "An embedding student has no labels to train on alone" in (run / "report.md").read_text()


def test_the_exported_encoder_loads_with_sentence_transformers(encoder_path, texts, tmp_path):
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    from distill.cli import main
    from distill.tasks import get_task
    from distill.tasks.hf import HFSpec, load_encoder

    assert (
        main(
            [
                "run",
                str(embedding_config(tmp_path, encoder_path, texts, student={"arch": "hf", "path": str(encoder_path)})),
                "--quiet",
            ]
        )
        == 0
    )
    exported = SentenceTransformer(str(tmp_path / "runs" / "emb" / "student-hf"), device="cpu")
    ours = load_encoder(HFSpec(path=tmp_path / "runs" / "emb" / "student-hf"), "student")
    sentences = ["cat dog fish the", "bread cheese", "goal team run race swim jump"]
    tokens = exported.tokenizer(sentences, padding=True, return_tensors="pt")
    mine = get_task("text_embedding").predict(
        ours, {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
    )
    theirs = torch.as_tensor(exported.encode(sentences, normalize_embeddings=False))
    assert torch.allclose(mine, theirs, atol=1e-5)
    if importlib.util.find_spec("onnxruntime") is not None:  # the ONNX export is the encoder too, pooled alike
        from distill.pipeline.export import OnnxRuntimeModel

        out = tmp_path / "onnx"
        assert main(["export", str(tmp_path / "runs" / "emb"), "--format", "onnx", "--out", str(out)]) == 0
        pooled = OnnxRuntimeModel(out / "model.onnx")(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
        assert pooled.shape == mine.shape and torch.allclose(pooled, mine, atol=1e-4)


def test_an_embedding_teacher_must_be_a_ready_encoder(encoder_path, texts, tmp_path, capsys):
    from distill.cli import main

    config = embedding_config(
        tmp_path, encoder_path, texts, teacher={"kind": "train", "model": {"arch": "hf", "path": str(encoder_path)}}
    )
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "teacher.kind: a text_embedding teacher is a ready encoder" in err and err.count("\n") == 1


def test_a_narrower_embedding_student_learns_through_a_projection(encoder_path, texts, tmp_path):
    from distill.cli import main

    student = {
        "arch": "hf_config",
        "num_hidden_layers": 1,
        "hidden_size": 8,
        "num_attention_heads": 2,
        "intermediate_size": 16,
    }
    assert main(["run", str(embedding_config(tmp_path, encoder_path, texts, student=student)), "--quiet"]) == 0
    run = tmp_path / "runs" / "emb"
    from safetensors.torch import load_file

    adapters = load_file(run / "adapters.safetensors")
    assert {tuple(v.shape) for k, v in adapters.items() if k.endswith("weight")} == {(16, 8)}  # 8 -> the teacher's 16
    assert json.loads((run / "student-hf" / "config.json").read_text())["hidden_size"] == 8
    # init: pca starts the projection from the teacher's principal directions: a lower first-epoch loss
    pca = embedding_config(
        tmp_path, encoder_path, texts, student=student, output={"dir": str(tmp_path / "runs"), "name": "pca"},
        distill={"terms": [{"type": "embed_cosine", "init": "pca", "calibration": 64}, {"type": "embed_mse", "init": "pca"}]},
    )  # fmt: skip
    assert main(["run", str(pca), "--quiet"]) == 0
    first = {
        name: json.loads((tmp_path / "runs" / name / "metrics.json").read_text())["training"]["distilled"]["history"][0]
        for name in ("emb", "pca")
    }
    assert first["pca"]["terms"]["embed_mse"] < first["emb"]["terms"]["embed_mse"]
