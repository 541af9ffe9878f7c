"""Prune, then distill: students cut from the teacher in width and depth, on tiny random Llama
(grouped-query attention, tied embeddings) and BERT models."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from tiny_lm import llama_config, llama_dir, text_file  # noqa: E402
from tiny_text import bert_config  # noqa: E402

from distill.core.errors import DistillError  # noqa: E402
from distill.pipeline.config import ExperimentConfig  # noqa: E402
from distill.tasks.hf import HFCausalLM, HFClassifier  # noqa: E402
from distill.tasks.prune import (  # noqa: E402
    BERT,
    LLAMA,
    Importance,
    PruneSpec,
    Shape,
    measure_importance,
    parameter_count,
    plan,
    prune_model,
    pruned_config,
    top,
)


def llama(seed: int = 0, **config) -> HFCausalLM:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    sizes = {"layers": 4, "hidden": 24, "heads": 6, "kv_heads": 3} | config
    return HFCausalLM(LlamaForCausalLM(llama_config(**sizes))).eval()


def bert(seed: int = 0) -> HFClassifier:
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return HFClassifier(BertForSequenceClassification(bert_config(layers=4, hidden=16, heads=4))).eval()


def calibration(seed: int = 0, vocab: int = 40) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (8, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    mask[3, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("make", [llama, bert], ids=["llama", "bert"])
def test_targets_of_one_reproduce_the_teacher_exactly(make):
    teacher, inputs = make(), calibration()
    student, record = prune_model(teacher, PruneSpec(), "student", inputs)
    assert torch.equal(logits(student, inputs), logits(teacher, inputs))
    assert record["parameters"]["student"] == record["parameters"]["teacher"]


def test_kept_tensors_are_the_teachers_slices_of_the_top_importance_units():
    teacher, inputs = llama(), calibration()
    student, record = prune_model(teacher, PruneSpec(layers=0.5, heads=0.67, mlp=0.5, hidden=0.75), "student", inputs)
    importance = record["importance"]
    kept_layers = record["kept_layers"]
    assert kept_layers == top(importance["layers"], 2)
    assert record["kept"]["hidden"] == top(importance["hidden"], 18)
    hidden = torch.tensor(record["kept"]["hidden"])
    for j, i in enumerate(kept_layers):
        assert record["kept"]["mlp"][j] == top(importance["mlp"][i], 24)
        group_scores = [sum(importance["heads"][i][2 * g : 2 * g + 2]) for g in range(3)]
        groups = top(group_scores, 2)
        assert record["kept"]["heads"][j] == [2 * g + h for g in groups for h in range(2)]  # whole GQA groups
        t, s = teacher.model.model.layers[i], student.model.model.layers[j]
        q_rows = torch.cat([torch.arange(h * 4, h * 4 + 4) for h in record["kept"]["heads"][j]])
        kv_rows = torch.cat([torch.arange(g * 4, g * 4 + 4) for g in groups])
        mlp = torch.tensor(record["kept"]["mlp"][j])
        assert torch.equal(s.self_attn.q_proj.weight, t.self_attn.q_proj.weight[q_rows][:, hidden])
        assert torch.equal(s.self_attn.k_proj.weight, t.self_attn.k_proj.weight[kv_rows][:, hidden])
        assert torch.equal(s.self_attn.v_proj.weight, t.self_attn.v_proj.weight[kv_rows][:, hidden])
        assert torch.equal(s.self_attn.o_proj.weight, t.self_attn.o_proj.weight[hidden][:, q_rows])
        assert torch.equal(s.mlp.down_proj.weight, t.mlp.down_proj.weight[hidden][:, mlp])
        assert torch.equal(s.input_layernorm.weight, t.input_layernorm.weight[hidden])
    embed = student.model.model.embed_tokens.weight
    assert torch.equal(embed, teacher.model.model.embed_tokens.weight[:, hidden])
    assert student.model.lm_head.weight is embed  # still tied
    config = student.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (2, 18, 24)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 4)


def test_plan_keeps_the_highest_scores_and_whole_key_value_groups():
    full = Shape(layers=3, hidden=6, heads=4, groups=2, head_dim=2, mlp=5)
    importance = Importance(
        layers=[0.1, 0.9, 0.5],
        hidden=[3.0, 1.0, 2.0, 6.0, 5.0, 4.0],
        heads=[[1.0, 1.0, 0.0, 3.0]] * 3,  # group 0: 2.0, group 1: 3.0
        mlp=[[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0], [0.0, 9.0, 0.0, 9.0, 0.0]],
    )
    target = Shape(layers=2, hidden=3, heads=2, groups=1, head_dim=2, mlp=2)
    chosen = plan(importance, full, target, LLAMA)
    assert chosen.layers == [1, 2]
    assert chosen.hidden == [3, 4, 5]
    assert chosen.groups == [[1], [1]] and chosen.heads == [[2, 3], [2, 3]]
    assert chosen.mlp == [[3, 4], [1, 3]]


def test_importance_ignores_padding():
    teacher = llama()
    inputs = calibration()
    padded = {k: torch.cat([v, torch.full((2, 12), 7) if k == "input_ids" else torch.zeros(2, 12, dtype=v.dtype)])
              for k, v in inputs.items()}  # fmt: skip
    a, b = measure_importance(teacher, inputs), measure_importance(teacher, padded)
    for name in ("layers", "hidden", "heads", "mlp"):
        assert torch.allclose(torch.tensor(getattr(a, name)), torch.tensor(getattr(b, name)), rtol=1e-6), name


def test_the_importance_of_an_mlp_neuron_is_its_mean_absolute_activation():
    teacher, inputs = llama(), calibration()
    seen = []
    down = teacher.model.model.layers[1].mlp.down_proj
    handle = down.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    logits(teacher, inputs)
    handle.remove()
    expected = seen[0][inputs["attention_mask"].bool()].abs().double().mean(0)
    measured = torch.tensor(measure_importance(teacher, inputs).mlp[1], dtype=torch.float64)
    assert torch.allclose(measured, expected, rtol=1e-9)


@pytest.mark.parametrize("make", [llama, bert], ids=["llama", "bert"])
def test_a_pruned_student_reloads_with_transformers_alone(make, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    teacher, inputs = make(), calibration()
    spec = PruneSpec(layers=0.75, heads=0.5, mlp=0.5) if make is bert else PruneSpec(heads=0.67, mlp=0.5, hidden=0.5)
    student, record = prune_model(teacher, spec, "student", inputs)
    student.model.save_pretrained(tmp_path, safe_serialization=True)
    auto = AutoModelForCausalLM if make is llama else AutoModelForSequenceClassification
    reloaded = auto.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, logits(student, inputs))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["distill_pruning"]["kept_layers"] == record["kept_layers"]
    assert saved["intermediate_size"] == record["intermediate_size"] < record["teacher"]["intermediate_size"]


def test_in_bert_the_hidden_size_follows_the_heads_and_both_at_odds_are_refused():
    teacher, inputs = bert(), calibration()
    student, record = prune_model(teacher, PruneSpec(heads=0.5), "student", inputs)
    assert (record["num_attention_heads"], record["hidden_size"]) == (2, 8)  # head size 4 kept
    with pytest.raises(DistillError, match="student.prune: in a BERT-like model the hidden size is heads × head size"):
        prune_model(teacher, PruneSpec(heads=0.5, hidden=0.75), "student", inputs)


@pytest.mark.parametrize(
    "make,budget", [(llama, 9000), (llama, 15000), (bert, 6000)], ids=["llama-9k", "llama-15k", "bert"]
)
def test_a_parameter_budget_is_met_within_one_neuron_per_layer(make, budget):
    teacher, inputs = make(), calibration()
    student, record = prune_model(teacher, PruneSpec(params=budget), "student", inputs)
    params = sum(p.numel() for p in student.parameters())
    assert params == record["parameters"]["student"] <= budget
    config = student.config
    if config.intermediate_size < teacher.config.intermediate_size:  # one more neuron per layer would not fit
        wider = pruned_config(config, Shape.of(config), LLAMA if make is llama else BERT)
        wider.intermediate_size += 1
        assert parameter_count(student.model, wider) > budget


def test_a_budget_takes_human_counts_and_is_checked():
    assert PruneSpec(params="60M").params == 60_000_000
    assert PruneSpec(params="1.5b").params == 1_500_000_000
    with pytest.raises(ValueError, match="not a parameter count"):
        PruneSpec(params="lots")
    with pytest.raises(ValueError, match="give params or mlp/hidden, not both"):
        PruneSpec(params=1000, mlp=0.5)
    teacher = llama()
    with pytest.raises(DistillError, match="is not below the teacher's 22,224 parameters"):
        prune_model(teacher, PruneSpec(params=10**6), "student", calibration())
    with pytest.raises(DistillError, match="below the smallest student"):
        prune_model(teacher, PruneSpec(params=100), "student", calibration())


def test_random_and_first_are_seeded_baselines():
    teacher = llama()
    spec = PruneSpec(method="random", mlp=0.5, seed=3)
    a, b = prune_model(teacher, spec, "s", None)[1], prune_model(teacher, spec, "s", None)[1]
    c = prune_model(teacher, spec.model_copy(update={"seed": 4}), "s", None)[1]
    assert a["kept"] == b["kept"] and a["kept"]["mlp"] != c["kept"]["mlp"]
    first = prune_model(teacher, PruneSpec(method="first", mlp=0.5, layers=0.5), "s", None)[1]
    assert first["kept_layers"] == [0, 1] and first["kept"]["mlp"] == [list(range(24))] * 2
    with pytest.raises(DistillError, match="method importance needs training data"):
        prune_model(teacher, PruneSpec(mlp=0.5), "s", None)


def test_the_config_takes_prune_as_one_rule_of_from_teacher(tmp_path):
    base = {
        "task": "causal_lm",
        "data": {"source": "text_file", "path": "x.txt"},
        "teacher": {"kind": "hf", "path": "t"},
        "distill": {"terms": [{"type": "kd"}]},
    }
    config = ExperimentConfig.model_validate(base | {"student": {"from_teacher": {"prune": {"mlp": 0.5}}}})
    assert config.student.prune.mlp == 0.5 and config.student.needs_calibration
    with pytest.raises(ValueError, match="exactly one of layers, every, first or prune"):
        ExperimentConfig.model_validate(base | {"student": {"from_teacher": {"every": 2, "prune": {"mlp": 0.5}}}})


def test_a_pruned_lm_run_heals_the_student_and_records_the_pruning(tmp_path):
    import yaml
    from transformers import AutoModelForCausalLM

    from distill.cli import main

    teacher = llama_dir(tmp_path / "llama", layers=4, hidden=24, heads=6, kv_heads=3)
    corpus = text_file(tmp_path / "docs.txt")
    config = {
        "task": "causal_lm",
        "data": {"source": "text_file", "path": str(corpus), "block_length": 16},
        "teacher": {"kind": "hf", "path": str(teacher)},
        "student": {"from_teacher": {"prune": {"layers": 0.5, "heads": 0.67, "mlp": 0.5}, "calibration": 16}},
        "distill": {"terms": [{"type": "kd", "temperature": 1}]},
        "baseline": False,
        "train": {"epochs": 2, "batch_size": 8, "optimizer": "adamw", "lr": 0.01, "schedule": "constant"},
        "eval": {"latency_batch_sizes": [1], "latency_repeats": 2},
        "output": {"dir": str(tmp_path / "runs"), "name": "pruned"},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "--quiet"]) == 0
    run = tmp_path / "runs" / "pruned"
    pruning = json.loads((run / "pruning.json").read_text())
    assert pruning["method"] == "importance" and len(pruning["kept_layers"]) == 2
    assert pruning["num_key_value_heads"] == 2 and pruning["intermediate_size"] == 24
    assert len(pruning["importance"]["mlp"]) == 4 and len(pruning["importance"]["mlp"][0]) == 48
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["pruning"]["summary"].startswith("pruned (importance): layers 2/4, hidden 24/24, heads 4/6")
    assert (run / "pruning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Pruning" in (run / "report.md").read_text() and "<h2>Pruning</h2>" in (run / "report.html").read_text()
    history = metrics["training"]["distilled"]["history"]
    assert history[-1]["terms"]["kd"] < history[0]["terms"]["kd"]  # healing lowers the divergence
    student = AutoModelForCausalLM.from_pretrained(run / "student-hf")
    assert student.config.num_key_value_heads == 2 and student.config.head_dim == 4
