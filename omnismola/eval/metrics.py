"""Benchmark metrics: predictions and reference answers -> a score in [0, 100].

Every metric is a `Metric` taking one list of acceptable answers per
prediction, registered in METRICS under the name tasks refer to.
Definitions follow the benchmarks' official evaluators; CIDEr is computed by
the official COCO scorer (pycocoevalcap), with its Java PTB tokenizer
replaced by an equivalent Python one so no JVM is needed.

This module must not import TensorFlow: the evaluator runs without it.
"""
import re
from typing import Callable, Sequence

import numpy as np

from omnismola import errors

Metric = Callable[[Sequence[str], Sequence[Sequence[str]]], float]


def _check(predictions, references) -> None:
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions but "
                     f"{len(references)} reference lists.")
  if not predictions:
    raise ValueError("A metric of zero examples is undefined.")
  if any(not refs for refs in references):
    raise ValueError("Every prediction needs at least one reference.")


def _mean_best(score: Callable[[str, str], float], predictions,
               references) -> float:
  """100 x the mean over examples of the best score(prediction, reference)
  over the example's references."""
  _check(predictions, references)
  return 100.0 * float(np.mean([max(score(p, g) for g in refs)
                                for p, refs in zip(predictions, references)]))


# ---------------------------------------------------------------- VQA accuracy
# The answer normalisation of the official VQA evaluation (vqaEval.py, as run
# by EvalAI), including its quirks, so scores compare with published numbers.

_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_",
              "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
# The official pattern: it meant "a period not between digits" but its
# lookbehind is malformed, so it strips every period not followed by a digit.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2",
                 "three": "3", "four": "4", "five": "5", "six": "6",
                 "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# Contractions written without their apostrophe -> the standard form.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve":
    "could've", "couldnt": "couldn't", "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve":
    "hadn't've", "hasnt": "hasn't", "havent": "haven't", "hed": "he'd",
    "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've",
    "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've":
    "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam":
    "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve":
    "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve":
    "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve":
    "shouldn't've", "somebody'd": "somebodyd", "somebodyd've":
    "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll":
    "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd":
    "something'd", "somethingd've": "something'd've", "something'dve":
    "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve":
    "there'd've", "therere": "there're", "theres": "there's", "theyd":
    "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll":
    "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve":
    "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered":
    "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos":
    "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys":
    "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall":
    "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've":
    "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll":
    "you'll", "youre": "you're", "youve": "you've",
}


def _vqa_punctuation(text: str) -> str:
  """Punctuation as the official evaluator treats it.

  A mark next to a space (or any mark, in a text with a comma between digits)
  is deleted; elsewhere it becomes a space ("t-shirt" -> "t shirt"). Periods
  are deleted unless a digit follows, which keeps "3.5".
  """
  out = text
  delete = bool(_COMMA_IN_NUMBER.search(text))
  for p in _VQA_PUNCT:
    if delete or p + " " in text or " " + p in text:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD.sub("", out)


def normalize_vqa_answer(answer: str) -> str:
  """The official VQA answer normalisation: punctuation, then lowercase,
  number words -> digits, no articles, contractions fixed."""
  answer = answer.replace("\n", " ").replace("\t", " ").strip()
  words = [_NUMBER_WORDS.get(w, w)
           for w in _vqa_punctuation(answer).lower().split()]
  words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
  return " ".join(words)


def vqa_accuracy(predictions: Sequence[str],
                 references: Sequence[Sequence[str]]) -> float:
  """VQA accuracy: mean over leave-one-out subsets of min(1, matches / 3).

  For each of the N human answers, the prediction scores min(1, m / 3) where
  m counts matching answers among the other N - 1; a question's accuracy is
  the mean over the N subsets (10 answers in VQAv2). Prediction and answers
  are both normalised. The official script skips normalisation when all ten
  answers agree; normalising always only ever credits predictions that
  differ from a unanimous answer in case, articles or punctuation.
  """
  _check(predictions, references)
  scores = []
  for prediction, answers in zip(predictions, references):
    if len(answers) < MIN_REFERENCES["vqa_accuracy"]:
      raise ValueError("vqa_accuracy needs several human answers per "
                       "question (VQAv2 has 10); use exact_match for tasks "
                       "with a single reference.")
    prediction = normalize_vqa_answer(prediction)
    hits = np.array([normalize_vqa_answer(a) == prediction for a in answers])
    others = hits.sum() - hits  # Matches among the other N - 1 answers.
    scores.append(np.mean(np.minimum(1.0, others / 3.0)))
  return 100.0 * float(np.mean(scores))


# ----------------------------------------------------------------- exact match
def exact_match(predictions: Sequence[str],
                references: Sequence[Sequence[str]]) -> float:
  """% of predictions equal to some reference, after strip and lowercase."""
  return _mean_best(lambda p, g: p.strip().lower() == g.strip().lower(),
                    predictions, references)


# ------------------------------------------------------------------------ ANLS
ANLS_THRESHOLD = 0.5


def levenshtein(a: str, b: str) -> int:
  """Edit distance (insertions, deletions, substitutions all cost 1)."""
  previous = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    current = [i]
    for j, cb in enumerate(b, 1):
      current.append(min(previous[j] + 1, current[j - 1] + 1,
                         previous[j - 1] + (ca != cb)))
    previous = current
  return previous[-1]


def _anls_one(prediction: str, answer: str) -> float:
  prediction, answer = prediction.strip().lower(), answer.strip().lower()
  length = max(len(prediction), len(answer))
  distance = levenshtein(prediction, answer) / length if length else 0.0
  return 1.0 - distance if distance < ANLS_THRESHOLD else 0.0


def anls(predictions: Sequence[str],
         references: Sequence[Sequence[str]]) -> float:
  """Average Normalised Levenshtein Similarity (DocVQA, ST-VQA), x100.

  Per question: max over answers g of 1 - NL(p, g) where the normalised
  distance NL = Lev(p, g) / max(|p|, |g|) is below 0.5, else 0.
  """
  return _mean_best(_anls_one, predictions, references)


# ------------------------------------------------------------ relaxed accuracy
RELAXED_TOLERANCE = 0.05


def _to_number(text: str) -> float | None:
  """'12', '3.5', '45%' (-> 0.45) as a float; None if not a number."""
  text = text.strip()
  scale = 1.0
  if text.endswith("%"):
    text, scale = text[:-1], 0.01
  try:
    return float(text) * scale
  except ValueError:
    return None


def _relaxed_one(prediction: str, answer: str) -> bool:
  p, g = _to_number(prediction), _to_number(answer)
  if p is not None and g:  # A zero gold has no relative tolerance.
    return abs(p - g) / abs(g) <= RELAXED_TOLERANCE
  return prediction.strip().lower() == answer.strip().lower()


def relaxed_accuracy(predictions: Sequence[str],
                     references: Sequence[Sequence[str]]) -> float:
  """ChartQA relaxed accuracy: numbers within 5% of the gold count as right.

  When prediction and gold both parse as numbers (the gold non-zero), the
  prediction is right iff |p - g| / |g| <= 0.05; otherwise it must equal the
  gold up to case (as in the Pix2Struct and PaLI evaluations). Max over
  references, % of questions.
  """
  return _mean_best(_relaxed_one, predictions, references)


# ----------------------------------------------------------------------- CIDEr
# What PTBTokenizer emits as punctuation and pycocoevalcap then drops; the
# Java tokenizer writes brackets as -LRB- etc., here they are dropped too.
_PTB_DROPPED = frozenset({"''", "'", "``", "`", '"', ".", "?", "!", ",", ":",
                          "-", "--", "...", ";", "(", ")", "[", "]", "{",
                          "}"})
# Clitics PTB splits off their word: "don't" -> "do n't", "cat's" -> "cat 's".
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
# Words keep inner hyphens, periods, slashes, apostrophes ("t-shirt", "3.5",
# "o'clock"); clitics, "...", "--" and every other mark are tokens alone.
_PTB_TOKEN = re.compile(r"n't|'\w+|\w+(?:[-./']\w+)*|\.\.\.|--|\S")


def ptb_tokenize(text: str) -> str:
  """Lowercased PTB-style tokens without punctuation, space-joined.

  Matches `PTBTokenizer -lowerCase` followed by pycocoevalcap's punctuation
  filter on ordinary captions, without needing Java.
  """
  text = _CLITIC.sub(r" \1", text.lower().replace("\n", " "))
  return " ".join(t for t in _PTB_TOKEN.findall(text)
                  if t not in _PTB_DROPPED)


def cider(predictions: Sequence[str],
          references: Sequence[Sequence[str]]) -> float:
  """CIDEr-D of the corpus (pycocoevalcap's scorer), x100.

  IDF comes from the references of the given examples, so the score depends
  on the whole set (a set of one example always scores 0).
  """
  # Imported here so training and decoding run where pycocoevalcap is not
  # installed (e.g. accelerator images); only scoring captions needs it.
  from pycocoevalcap.cider.cider import Cider  # pylint: disable=g-import-not-at-top
  _check(predictions, references)
  res = {i: [ptb_tokenize(p)] for i, p in enumerate(predictions)}
  gts = {i: [ptb_tokenize(r) for r in refs]
         for i, refs in enumerate(references)}
  score, _ = Cider().compute_score(gts, res)
  return 100.0 * float(score)


METRICS: dict[str, Metric] = {
    "vqa_accuracy": vqa_accuracy,
    "exact_match": exact_match,
    "anls": anls,
    "relaxed_accuracy": relaxed_accuracy,
    "cider": cider,
}


# References an example needs for the metric to be defined (default 1):
# VQA accuracy counts agreement among human answers.
MIN_REFERENCES = {"vqa_accuracy": 2}


def get(metric_name: str) -> Metric:
  """METRICS[metric_name]; an unknown name is an error listing the names."""
  if metric_name not in METRICS:
    raise errors.InputError(f"Unknown metric {metric_name!r}; metrics: "
                            f"{', '.join(sorted(METRICS))}.")
  return METRICS[metric_name]


def compute(metric_name: str, predictions: Sequence[str],
            references: Sequence[Sequence[str]]) -> float:
  """METRICS[metric_name](predictions, references), with a helpful error."""
  return get(metric_name)(predictions, references)
