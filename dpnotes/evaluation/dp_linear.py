"""DP linear coders: one logistic-regression head per public label over fixed features, trained
with the project's `PrivacyEngine` (per-unit clipping, Poisson sampling, calibrated noise) through
the same loop as the DP-LoRA coder (`dp_classifier.DPCoder`).

Only the head sees private data, so only its d·L + L parameters take noise. The feature maps are
fixed before training and release nothing about the notes:

* `HashedNgramFeatures`: hashed words (n-grams optional), L2-normalised. Hashing is
  data-independent, so no vocabulary (which would list words of the private notes) is fitted or
  released.
* `FrozenEncoderFeatures`: mean-pooled, L2-normalised states of a frozen encoder (MiniLM), a linear
  probe on public pretrained features (Tramèr & Boneh 2021: under DP it beats end-to-end
  fine-tuning at small and medium ε, since the noise has few dimensions to spread over).

Features are L2-normalised, so a note's gradient norm is √2·||sigmoid(z) - y|| (weights and
biases) whatever its length: the scale the clipping norm is set against.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dpnotes.corpus.schema import Note
from dpnotes.evaluation.coders import EvalInputError, _require_notes, mean_pool
from dpnotes.evaluation.dp_classifier import DPCoder, DPTraining, EncoderFactory, multilabel_summed_losses, start_from_titles
from dpnotes.models import load_encoder



class HashedNgramFeatures:
    """Word n-grams hashed into `n_features` buckets (no fitted vocabulary), L2-normalised counts.

    Unigrams by default: on dev, adding bigrams gave the same weighted F1 on the default corpus at
    ε = 1 (0.944 against 0.941) and a lower one on MTSamples at ε = 10 (0.76 against 0.80; a
    note's unit norm is spread over twice the features), at three times the cost. 2^14 buckets:
    2^15 gave the same F1 (0.905 against 0.903, bigrams, Adam) at twice the cost per step, which
    is linear in the width (the clipper densifies each micro-batch).
    """

    RECENT = 4  # text lists whose rows are kept: train, dev, test and the code titles of a sweep over ε

    def __init__(self, n_features: int = 2**14, ngram_range: tuple[int, int] = (1, 1)):
        from sklearn.feature_extraction.text import HashingVectorizer

        # alternate_sign=False: signed hashing makes colliding n-grams cancel, which a probability
        # model over counts does not want; collisions only add small shared weights.
        self.vectorizer = HashingVectorizer(n_features=n_features, ngram_range=ngram_range, alternate_sign=False,
                                            norm="l2", strip_accents="unicode", dtype=np.float32)
        self._recent: dict[tuple[str, ...], object] = {}

    def transform(self, texts: Sequence[str]):
        """(texts, n_features) sparse CSR rows."""
        key = tuple(texts)
        if key not in self._recent:
            if len(self._recent) == self.RECENT:
                del self._recent[next(iter(self._recent))]
            self._recent[key] = self.vectorizer.transform(key)
        return self._recent[key]


class FrozenEncoderFeatures:
    """Mean-pooled, L2-normalised last hidden states of a frozen encoder (computed without grad).

    `model`: an alias/path for `dpnotes.models.load_encoder` or a factory. Encodings are kept in
    memory by text, so a sweep over ε encodes each note once; `feature_cache` (a .npz path) also keeps
    them on disk between runs. The cache holds features of the private notes: it is secret
    material, to be stored where the notes are.

    max_length 128 for cost: MiniLM encodes ~30 notes/s at 128 tokens on two busy CPU cores (the
    40,000 notes of the 20,000-patient default corpus took 24 minutes), about half that at 256.
    """

    CHUNK = 2048  # texts encoded between two cache writes: an interrupted run keeps its progress

    def __init__(self, model: str | EncoderFactory = "minilm", max_length: int = 128, batch_size: int = 64,
                 bf16: bool = True, feature_cache: str | Path | None = None):
        if feature_cache is not None and callable(model):
            raise EvalInputError("a feature cache needs a named encoder (a factory has no stable name)")
        self.model_spec, self.max_length, self.batch_size, self.bf16 = model, max_length, batch_size, bf16
        self.cache = Path(feature_cache) if feature_cache is not None else None
        self._encoder = None
        self._by_key: dict[str, np.ndarray] = self._read_cache()

    @property
    def spec(self) -> str:
        """What the features depend on besides the text (a cache written for another spec is refused)."""
        return f"{self.model_spec}|max_length={self.max_length}|mean|l2"

    def _read_cache(self) -> dict[str, np.ndarray]:
        if self.cache is None or not self.cache.exists():
            return {}
        with np.load(self.cache) as stored:
            if str(stored["spec"]) != self.spec:
                raise EvalInputError(f"feature cache {self.cache} holds {stored['spec']}, not {self.spec}")
            return dict(zip(stored["keys"].tolist(), stored["vectors"]))

    def _write_cache(self) -> None:
        keys = list(self._by_key)
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        with open(self.cache, "wb") as handle:  # np.savez would append ".npz" to another suffix
            np.savez(handle, spec=self.spec, keys=np.array(keys), vectors=np.stack([self._by_key[k] for k in keys]))

    def _load(self):
        if self._encoder is None:
            if callable(self.model_spec):
                self._encoder = self.model_spec()
            else:
                self._encoder = load_encoder(self.model_spec)
            self._encoder[0].eval()
        return self._encoder

    @torch.inference_mode()
    def _encode(self, texts: list[str]) -> np.ndarray:
        encoder, tokenizer = self._load()
        out = []
        # bf16 autocast: about 2x faster on CPUs with AMX; the pooled vectors keep cosine > 0.9999 to fp32.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            for start in range(0, len(texts), self.batch_size):
                batch = tokenizer(texts[start : start + self.batch_size], padding=True, truncation=True,
                                  max_length=self.max_length, return_tensors="pt")
                states = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
                out.append(F.normalize(mean_pool(states.float(), batch["attention_mask"]), dim=1).numpy())
        return np.concatenate(out, axis=0)

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        """(texts, hidden) float32 rows; only texts not seen before are encoded."""
        keys = [hashlib.sha256(text.encode("utf-8")).hexdigest() for text in texts]
        missing = list(dict.fromkeys(k for k in keys if k not in self._by_key))
        text_of = dict(zip(keys, texts))
        for start in range(0, len(missing), self.CHUNK):
            chunk = missing[start : start + self.CHUNK]
            self._by_key.update(zip(chunk, self._encode([text_of[k] for k in chunk])))
            if self.cache is not None:
                self._write_cache()
        return np.stack([self._by_key[k] for k in keys])


def _dense(rows) -> torch.Tensor:
    return torch.from_numpy(rows.toarray() if hasattr(rows, "toarray") else np.asarray(rows)).float()


class DPLinearCoder(DPCoder):
    """A DP logistic-regression head (nn.Linear) over `features` (anything with
    `transform(texts) -> (n, d)` dense or sparse rows), trained with DP-SGD with momentum.

    The head starts as a zero-shot coder built from public knowledge: `titles` ({code: public
    title}, `prompting.label_titles`) set each titled code's weight row to title_scale · φ(title),
    the feature map of its title, so before any private step a note scores each code by its
    similarity to the code's title (untitled codes start at 0). The private steps then only have
    to correct that start, which noise permits where learning each row from 0 does not. title_scale
    40 (TITLE_SCALE): see docs/utility.md section 4 for the scales tried.

    The defaults were chosen on train/dev data only (test notes never: `bench/dp_coders.py
    --dev-only`, and `--inner`: partitions of the train split, docs/utility.md section 4):

    * SGD with momentum 0.9, not Adam: Adam divides each coordinate by its (noise-dominated) RMS,
      so the many coordinates that carry only noise take full-size steps; with hashed n-grams SGD
      gave weighted F1 0.944 against Adam's best 0.903, with the probe 0.795 against 0.750.
    * max_grad_norm 0.1: nearly every unit is clipped (per-patient norms are ~1-4 at the start),
      so each contributes a normalised direction and only lr·C sets the step.
    * 300 steps: 150 at the same lr gave 0.930 on the 20,000-patient default corpus at ε = 1.
    * learning_rate None: scaled to the noise. With full batches σ grows as √T/ε, so the noise a
      head accumulates over T steps grows as lr·T·C/(N·ε), N the privacy units (a count the
      accountant already treats as public: q = B/N); past some lr·T it outgrows the fit. So
      lr = LEARNING_RATE · min(1, N·ε / FULL_RATE_UNIT_EPSILON). LEARNING_RATE 50 (lr·C = 5) was the best on
      the 20,000-patient default corpus at ε = 1 (lr·C 2.5 and 10 gave 0.934 and 0.920 against
      0.944); on CMC-2007 at ε = 10 (N·ε ≈ 7,800) the full rate follows the noise. FULL_RATE_UNIT_EPSILON
      15,000 keeps that rate where it was chosen; half of it (lr·T = N·ε/2) did as well on the
      small corpora (CMC-2007 better at ε = 10, MTSamples hashed worse), within their noise.
    * expected_batch_size None: 1024 units, or every unit (q = 1) on corpora of at most 2048
      units. On MTSamples full batches beat q = 0.16 at ε = 10 (0.76 against 0.73), and they keep
      the accountant closed-form, where a subsampled RDP query at q ≈ 0.5 costs ~1.5 s (the engine
      makes two per step).
    """

    FULL_BATCH_UNITS = 2048
    BATCH = 1024
    LEARNING_RATE = 50.0
    FULL_RATE_UNIT_EPSILON = 15_000.0
    TITLE_SCALE = 40.0

    TRAINING = DPTraining(steps=300, expected_batch_size=None, micro_batch_size=512, max_grad_norm=0.1, learning_rate=None)

    def __init__(self, epsilon: float, labels: Sequence[str], features: HashedNgramFeatures | FrozenEncoderFeatures,
                 titles: Mapping[str, str] | None = None, title_scale: float = TITLE_SCALE, momentum: float = 0.9,
                 log: Callable[[str], None] | None = None, **training):
        super().__init__(epsilon, labels, clipping="bk", log=log, **training)
        self.features, self.titles, self.title_scale, self.momentum = features, dict(titles or {}), title_scale, momentum

    def _expected_batch(self, num_units: int) -> int:
        if self.expected_batch_size is None:
            return num_units if num_units <= self.FULL_BATCH_UNITS else self.BATCH
        return super()._expected_batch(num_units)

    def _learning_rate(self, num_units: int) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return self.LEARNING_RATE * min(1.0, num_units * self.epsilon / self.FULL_RATE_UNIT_EPSILON)

    def _head(self, dim: int) -> nn.Linear:
        head = nn.Linear(dim, len(self.labels))
        # The bias prior of a rare code (p ≈ 0.05 at -3): DP-SGD would otherwise spend its first steps
        # walking the biases down from p = 0.5, with noise added on the way.
        start_from_titles(head, self.labels, self.titles, self.title_scale, self.head_bias_init,
                          lambda texts: _dense(self.features.transform(texts)))
        return head

    def fit(self, train, dev=None):
        targets = self._public_targets(train)
        x = self.features.transform([n.text for n in train])
        self.model_ = self._head(x.shape[1])

        def fetch(indices: list[int]) -> dict[str, torch.Tensor]:
            return {"input": _dense(x[indices]), "labels": targets[indices]}  # nn.Linear(input)

        learning_rate = self._learning_rate(self._units(train)[1])
        self._train_private(self.model_, fetch, multilabel_summed_losses, train,
                            torch.optim.SGD(self.model_.parameters(), lr=learning_rate, momentum=self.momentum))
        self.privacy_["learning_rate"] = learning_rate
        return self

    @torch.no_grad()
    def predict_proba(self, notes: Sequence[Note], batch_size: int = 1024) -> np.ndarray:
        _require_notes(notes, "prediction")
        x = self.features.transform([n.text for n in notes])
        out = [torch.sigmoid(self.model_(_dense(x[start : start + batch_size]))).numpy()
               for start in range(0, x.shape[0], batch_size)]
        return np.concatenate(out, axis=0)


def _pop(options: dict, names: Sequence[str]) -> dict:
    return {name: options.pop(name) for name in names if name in options}


# kind -> (feature map, the options that configure it rather than the coder)
FEATURES = {
    "probe": (FrozenEncoderFeatures, ("model", "max_length", "feature_cache")),
    "hashed": (HashedNgramFeatures, ("n_features", "ngram_range")),
}


def linear_coders(kind: str, labels: Sequence[str], **options) -> Callable[[float], DPLinearCoder]:
    """ε -> DPLinearCoder over one feature map of `kind`, shared by every ε (a sweep encodes each
    note once). Feature options (FEATURES) configure the map, the others the coder."""
    feature_map, names = FEATURES[kind]
    features = feature_map(**_pop(options, names))
    return lambda epsilon: DPLinearCoder(epsilon, labels, features, **options)
