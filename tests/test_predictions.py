"""A teacher's test predictions remembered between runs: reused only for the same weights, inputs and outputs."""

from dataclasses import dataclass

import torch
from torch import nn

from distill.core.data import Split
from distill.core.evaluate import predict as predict_logits
from distill.pipeline.predictions import PROBES, probe_index, remembered_predictions


def _split(seed: int = 0, n: int = 100) -> Split:
    generator = torch.Generator().manual_seed(seed)
    return Split(torch.randn(n, 6, generator=generator), torch.randint(0, 3, (n,), generator=generator))


def predict(model: nn.Module, split: Split) -> torch.Tensor:
    return predict_logits(model, split.x)


def _counting():
    """predict() that records how many samples it was asked for."""
    seen: list[int] = []

    def run(model: nn.Module, split: Split) -> torch.Tensor:
        seen.append(len(split))
        return predict(model, split)

    return run, seen


def test_a_second_call_reads_the_logits_and_predicts_only_the_probes(tmp_path):
    torch.manual_seed(0)
    model, test = nn.Linear(6, 3), _split()
    run, seen = _counting()
    first, remembered = remembered_predictions(model, "sha-a", test, run, tmp_path, "image")
    assert not remembered and seen == [100]
    assert torch.equal(first, predict(model, test))
    again, remembered = remembered_predictions(model, "sha-a", test, run, tmp_path, "image")
    assert remembered and seen == [100, len(probe_index(100))] and len(probe_index(100)) == PROBES
    assert torch.equal(again, first)  # bit for bit what the first run computed
    assert probe_index(100)[[0, -1]].tolist() == [0, 99]  # spread over the whole split


def test_other_weights_inputs_or_task_are_predicted_afresh(tmp_path):
    torch.manual_seed(0)
    model, test = nn.Linear(6, 3), _split()
    run, seen = _counting()
    remembered_predictions(model, "sha-a", test, run, tmp_path, "image")
    for sha, split, task in (("sha-b", test, "image"), ("sha-a", _split(seed=1), "image"), ("sha-a", test, "text")):
        seen.clear()
        logits, remembered = remembered_predictions(model, sha, split, run, tmp_path, task)
        assert not remembered and seen == [100]
        assert torch.equal(logits, predict(model, split))


def test_an_edited_forward_with_the_same_weights_is_caught_by_the_probes(tmp_path):
    torch.manual_seed(0)
    model, test = nn.Linear(6, 3), _split()
    remembered_predictions(model, "sha-a", test, predict, tmp_path, "image")
    edited = nn.Sequential(model, nn.ReLU())  # same weights file, another forward()
    logits, remembered = remembered_predictions(edited, "sha-a", test, predict, tmp_path, "image")
    assert not remembered
    assert torch.equal(logits, predict(edited, test))
    _, remembered = remembered_predictions(edited, "sha-a", test, predict, tmp_path, "image")
    assert remembered  # the edited model's logits replaced the old ones


def test_an_unreadable_file_is_made_again(tmp_path):
    torch.manual_seed(0)
    model, test = nn.Linear(6, 3), _split()
    remembered_predictions(model, "sha-a", test, predict, tmp_path, "image")
    (stored,) = (tmp_path / "predictions").iterdir()
    stored.write_bytes(b"not safetensors")
    logits, remembered = remembered_predictions(model, "sha-a", test, predict, tmp_path, "image")
    assert not remembered and torch.equal(logits, predict(model, test))
    assert remembered_predictions(model, "sha-a", test, predict, tmp_path, "image")[1]


def test_a_cache_folder_that_cannot_be_written_costs_only_the_memory(tmp_path):
    torch.manual_seed(0)
    model, test = nn.Linear(6, 3), _split()
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would be")
    logits, remembered = remembered_predictions(model, "sha-a", test, predict, blocked, "image")
    assert not remembered and torch.equal(logits, predict(model, test))


@dataclass
class Scores:
    """Like a language model's token scores: float and integer fields, one of them unset."""

    logprob: torch.Tensor
    top: torch.Tensor
    kl: torch.Tensor | None = None


def test_predictions_of_several_tensors_come_back_whole_and_are_checked_on_their_floats(tmp_path):
    torch.manual_seed(0)
    model, test = nn.Linear(6, 3), _split()

    def scores(m: nn.Module, split: Split) -> Scores:
        logits = predict(m, split)
        return Scores(logprob=torch.log_softmax(logits, -1), top=logits.argmax(-1))

    first, remembered = remembered_predictions(model, "sha-a", test, scores, tmp_path, "causal_lm")
    again, remembered_again = remembered_predictions(model, "sha-a", test, scores, tmp_path, "causal_lm")
    assert (remembered, remembered_again) == (False, True)
    assert isinstance(again, Scores) and again.kl is None
    assert torch.equal(again.logprob, first.logprob) and torch.equal(again.top, first.top)
    with torch.no_grad():
        model.bias[0] += 1.0  # same weights file named, other outputs: the log-probabilities differ on the probes
    _, remembered = remembered_predictions(model, "sha-a", test, scores, tmp_path, "causal_lm")
    assert not remembered
