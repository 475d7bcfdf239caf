"""Metrics on fixtures whose scores are worked out by hand."""
import sys

import pytest
from pycocoevalcap.cider import cider as coco_cider

from omnismola.eval import metrics


def test_metrics_module_does_not_need_tensorflow():
  # The evaluator runs where TensorFlow is absent; importing metrics must not
  # pull it in (checked in a fresh interpreter, since other tests import it).
  import subprocess  # pylint: disable=g-import-not-at-top
  code = ("import sys; import omnismola.eval.metrics; "
          "sys.exit('tensorflow' in sys.modules)")
  assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("raw, normalized", [
    ("Two", "2"),                 # Number words -> digits, lowercase.
    ("the dog", "dog"),           # Articles go.
    ("A Red Car", "red car"),
    ("dont", "don't"),            # Contractions get their apostrophe.
    ("yes!", "yes"),              # A mark at the end becomes a space.
    ("t-shirt", "t shirt"),       # ... and inside a word too.
    ("red, blue", "red blue"),    # A mark next to a space is deleted.
    ("1,000", "1000"),            # A comma between digits is deleted.
    ("3.5", "3.5"),               # A decimal point stays,
    ("end.", "end"),              # any other period goes.
    ("  two\tdogs\n", "2 dogs"),
])
def test_vqa_answer_normalisation(raw, normalized):
  assert metrics.normalize_vqa_answer(raw) == normalized


def test_vqa_accuracy_leave_one_out():
  # 10 annotators, 2 said "cat". Leaving out a "cat" (2 of the 10 subsets)
  # leaves 1 match: 1/3; leaving out a "dog" (8 subsets) leaves 2: 2/3.
  refs = ["cat", "cat"] + ["dog"] * 8
  assert metrics.vqa_accuracy(["cat"], [refs]) == pytest.approx(
      100 * (2 * (1 / 3) + 8 * (2 / 3)) / 10)
  # 3 agreeing: subsets without one of them have 2 matches (3 subsets),
  # the other 7 have 3: (3 * 2/3 + 7 * 1) / 10 = 0.9.
  refs3 = ["cat"] * 3 + ["dog"] * 7
  assert metrics.vqa_accuracy(["cat"], [refs3]) == pytest.approx(90.0)
  # Normalisation applies to the prediction: "The Dog." == "dog".
  assert metrics.vqa_accuracy(["The Dog."], [refs]) == pytest.approx(100.0)
  assert metrics.vqa_accuracy(["bird"], [refs]) == 0.0
  # The mean over questions.
  assert metrics.vqa_accuracy(["dog", "bird"], [refs, refs]) == pytest.approx(
      50.0)
  # Answers normalise too: "two" in the references matches "2".
  assert metrics.vqa_accuracy(["2"], [["two"] * 10]) == 100.0


def test_vqa_accuracy_refuses_a_single_reference():
  with pytest.raises(ValueError, match="several human answers"):
    metrics.vqa_accuracy(["cat"], [["cat"]])


def test_exact_match_strips_and_ignores_case():
  assert metrics.exact_match(["  Apple ", "pear", "fig"],
                             [["APPLE"], ["apple"], ["date", "fig"]]) == (
                                 pytest.approx(200 / 3))
  # Only strip + lowercase: no VQA-style normalisation.
  assert metrics.exact_match(["the 2"], [["2"]]) == 0.0


def test_anls_values_threshold_and_best_reference():
  assert metrics.levenshtein("kitten", "sitting") == 3
  assert metrics.levenshtein("", "abc") == 3
  # "helo" vs "hello": 1 edit / 5 -> 1 - 0.2.
  assert metrics.anls(["helo"], [["hello"]]) == pytest.approx(80.0)
  # Case and surrounding spaces do not count.
  assert metrics.anls([" HELLO "], [["hello"]]) == pytest.approx(100.0)
  # 2 edits / 4 = 0.5 is not below the 0.5 threshold -> 0.
  assert metrics.anls(["abxy"], [["abcd"]]) == 0.0
  # 3 edits / 7 < 0.5 -> 4/7.
  assert metrics.anls(["abcdxyz"], [["abcdefg"]]) == pytest.approx(
      100 * 4 / 7)
  # The best reference counts; the mean is over questions.
  assert metrics.anls(["helo", "zzz"], [["xyz", "hello"], ["abc"]]) == (
      pytest.approx(40.0))


@pytest.mark.parametrize("prediction, reference, correct", [
    ("105", "100", True),     # Exactly 5% above: inside.
    ("95", "100", True),      # Exactly 5% below: inside.
    ("105.01", "100", False),
    ("94.9", "100", False),
    ("-1.04", "-1", True),    # Relative to |gold|.
    ("7", "7.0", True),
    ("0.5", "0", False),      # A zero gold needs an exact string match,
    ("0", "0", True),
    ("12%", "0.12", True),    # "12%" parses as 0.12.
    ("Red", "red", True),     # Non-numbers: case-insensitive exact match.
    ("red", "blue", False),
    ("7 apples", "7", False),
])
def test_relaxed_accuracy_edges(prediction, reference, correct):
  assert metrics.relaxed_accuracy([prediction], [[reference]]) == (
      100.0 if correct else 0.0)


def test_relaxed_accuracy_takes_the_best_reference():
  assert metrics.relaxed_accuracy(["10"], [["50", "10.4"]]) == 100.0


@pytest.mark.parametrize("text, tokens", [
    ("A Red circle, here.", "a red circle here"),
    ("The dog's ball... isn't \"red\"!", "the dog 's ball is n't red"),
    ("a t-shirt (blue) costs 3.50", "a t-shirt blue costs 3.50"),
])
def test_ptb_tokenize_lowercases_and_drops_punctuation(text, tokens):
  assert metrics.ptb_tokenize(text) == tokens


def test_cider_hand_computed_value():
  # Two images with disjoint words, each candidate equal to its only
  # reference. Every n-gram then has df = 1, idf = log(2 / 1) for both
  # vectors, cosine 1 and no length penalty, for each n = 1..4: image 0
  # scores 10 * mean_n(1) = 10. Image 1 ("zzz" vs a 3-word reference) shares
  # nothing: 0. CIDEr-D = (10 + 0) / 2 = 5, reported x100.
  score = metrics.cider(["red circle here now", "zzz"],
                        [["red circle here now"], ["blue square there"]])
  assert score == pytest.approx(500.0)


def test_cider_is_pycocoevalcaps_score_on_ptb_tokens():
  predictions = ["A red circle.", "blue square and gold circle",
                 "a pink triangle", "two cyan squares"]
  references = [["red circle", "a red circle", "there is a red circle"],
                ["blue square and gold circle",
                 "a gold circle and a blue square"],
                ["gold triangle", "a gold triangle"],
                ["two cyan squares", "a pair of cyan squares"]]
  gts = {i: [" ".join(r.lower().replace(".", "").split()) for r in refs]
         for i, refs in enumerate(references)}
  res = {i: [p.lower().replace(".", "")] for i, p in enumerate(predictions)}
  expected, _ = coco_cider.Cider().compute_score(gts, res)
  assert metrics.cider(predictions, references) == pytest.approx(
      100 * expected)
  # The value pycocoevalcap 1.2 gives this fixture, pinned.
  assert metrics.cider(predictions, references) == pytest.approx(
      463.0970121189, abs=1e-6)


def test_cider_ranks_identical_above_disjoint_captions():
  refs = [["a red circle", "there is a red circle"],
          ["blue square and gold circle", "a gold circle and a blue square"],
          ["a gold triangle", "gold triangle"]]
  identical = metrics.cider([r[0] for r in refs], refs)
  disjoint = metrics.cider(["xx yy zz"] * 3, refs)
  assert identical > 100.0 and disjoint == 0.0
  # A single example has no document frequencies to weight by: always 0.
  assert metrics.cider(["a red circle"], [["a red circle"]]) == 0.0


def test_compute_dispatches_and_rejects_bad_input():
  assert metrics.compute("exact_match", ["a"], [["A"]]) == 100.0
  assert set(metrics.METRICS) == {"vqa_accuracy", "exact_match", "anls",
                                  "relaxed_accuracy", "cider"}
  with pytest.raises(ValueError, match="Unknown metric 'bleu'"):
    metrics.compute("bleu", ["a"], [["a"]])
  with pytest.raises(ValueError, match="2 predictions but 1"):
    metrics.exact_match(["a", "b"], [["a"]])
  with pytest.raises(ValueError, match="zero examples"):
    metrics.anls([], [])
  with pytest.raises(ValueError, match="at least one reference"):
    metrics.exact_match(["a"], [[]])
