"""The clarifying-QA environment: rules, truthful user, horizon, malformed turns, determinism, the
scripted policies, and `refit-fast collect`. Pure Python, a few seconds."""
import json

import pytest

from refit_fast.envs import (
    ATTRIBUTES,
    KINDS,
    OPTIMAL,
    AnswerAtOncePolicy,
    BehaviorPolicy,
    ClarifyConfig,
    ClarifyEnv,
    collect,
    corpus,
    episode_seeds,
    evaluate,
    make_episode,
    parse_turn,
    read_jsonl,
    read_state,
    rollout,
    summarize,
    vocabulary,
    write_jsonl,
)
from refit_fast.envs.clarify import NOT_UNDERSTOOD

SEEDS = range(200)


def _other_value(ep, attribute):
    return next(v for v in ATTRIBUTES[attribute] if v != ep.value_of(attribute))


def test_reset_gives_an_ambiguous_opening():
    for s in SEEDS:
        env = ClarifyEnv()
        messages = env.reset(s)
        ep = env.episode
        assert [m["role"] for m in messages] == ["system", "user"]
        assert all(isinstance(m["content"], str) and m["content"] for m in messages)
        assert ep.kind in messages[1]["content"].split()
        # The opening never tells the items apart: no value of the differing attribute appears in it.
        assert not set(ATTRIBUTES[ep.attribute]) & set(messages[1]["content"].split())
        assert len(set(ep.options)) == len(ep.options) == 4
        for a in ATTRIBUTES:  # exactly one attribute differs between items
            values = {ep.value_of(a, i) for i in range(len(ep.options))}
            assert len(values) == (4 if a == ep.attribute else 1)


def test_rewards_correct_wrong_ambiguous():
    for s in SEEDS:
        ep = make_episode(s)
        wrong = next(i for i in range(len(ep.options)) if i != ep.target)
        other_kind = next(k for k in KINDS if k != ep.kind)
        shared_attr = next(iter(ep.shared))
        cases = {
            f"it is the {ep.item_name()} .": 1.0,
            f"{ep.options[ep.target]}": 1.0,
            f"it is the {ep.shared[shared_attr]} {ep.item_name()} .": 1.0,  # extra true detail is fine
            f"it is the {ep.item_name(wrong)} .": 0.0,
            f"it is the {ep.options[ep.target]} {other_kind} .": 0.0,  # wrong kind of item
            f"it is the {ep.shared[shared_attr]} {ep.kind} .": 0.0,  # ambiguous: fits every item
            f"it is the {_other_value(ep, shared_attr)} {ep.item_name()} .": 0.0,  # contradicts a fact
        }
        for text, expected in cases.items():
            env = ClarifyEnv()
            env.reset(s)
            reply, done, reward, info = env.step(text)
            assert (reply, done, reward) == (None, True, expected), text
            assert info["kind"] == "answer" and info["well_formed"] and info["correct"] == bool(expected)


def test_user_answers_truthfully_and_only_the_differing_attribute_informs():
    for s in SEEDS:
        env = ClarifyEnv(max_turns=5)
        env.reset(s)
        ep = env.episode
        for attribute in ATTRIBUTES:
            reply, done, reward, info = env.step(f"what {attribute} is it ?")
            assert reply == f"it is {ep.value_of(attribute)} ." and not done and reward == 0.0
            assert info["kind"] == "question" and info["attribute"] == attribute
            assert info["informative"] == (attribute == ep.attribute)
        assert ep.value_of(ep.attribute) == ep.options[ep.target]


def test_horizon():
    for max_turns in (1, 2, 3, 5):
        env = ClarifyEnv(max_turns=max_turns)
        env.reset(11)
        for t in range(max_turns):
            reply, done, reward, info = env.step("what color is it ?")
            assert info["turn"] == t and reward == 0.0
            assert done == (t == max_turns - 1)
            assert (reply is None) == done
        assert sum(m["role"] == "assistant" for m in env.messages) == max_turns
        assert env.messages[-1]["role"] == "assistant"  # the log ends on the agent's turn
        with pytest.raises(RuntimeError):
            env.step("it is the red ball .")
    # An answer on the last turn still counts.
    env = ClarifyEnv(max_turns=2)
    env.reset(3)
    env.step("what size is it ?")
    assert env.step(f"it is the {env.episode.item_name()} .")[1:3] == (True, 1.0)


MALFORMED = [
    "",
    "   \n\t",
    "asdf qwerty zxcv",
    "x" * 200_000,
    "what " * 50_000,
    "什么颜色？ 🤔 ¿Qué?",
    "\x00\x01\ufffd",
    None,
    12345,
    "is it red ?",  # yes/no questions are not part of the game
    "what color and size is it ?",  # two questions at once
    "what color is the red ball ?",
    "what is it ?",
    "ok .",
]


@pytest.mark.parametrize("text", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_turn_is_a_wasted_turn(text):
    env = ClarifyEnv(max_turns=2)
    env.reset(5)
    reply, done, reward, info = env.step(text)
    assert (reply, done, reward) == (NOT_UNDERSTOOD, False, 0.0)
    assert info["kind"] == "malformed" and not info["well_formed"]
    # Wasted on the last turn: the episode ends with reward 0, still no exception.
    reply, done, reward, info = env.step(text)
    assert (reply, done, reward, info["well_formed"]) == (None, True, 0.0, False)


def test_lenient_parsing():
    assert parse_turn("  What COLOUR is it??  ").attribute == "color"
    assert parse_turn("Size?").attribute == "size"
    assert parse_turn("tell me the material please").attribute == "material"
    answer = parse_turn("It's the RED Ball!!!")
    assert answer.kind == "answer" and answer.values == ("red",) and answer.kinds == ("ball",)
    assert parse_turn("ＲＥＤ") == parse_turn("red")  # full-width letters normalize (NFKC)
    # A long answer is read too, up to the first 4096 characters.
    assert parse_turn("well , " * 100 + "it is the red ball .").kind == "answer"


def test_canonical_flags_rambling_that_still_parses():
    env = ClarifyEnv()
    env.reset(7)  # yellow / red / black / green book, the user means the yellow one
    assert env.step("What color is it?")[3]["canonical"]
    info = env.step("it is the yellow yellow yellow book it is it")[3]
    assert info["correct"] and info["well_formed"] and not info["canonical"]
    env.reset(7)
    assert env.step("it is the yellow book .")[3]["canonical"]
    assert evaluate(OPTIMAL, n_episodes=20, progress=False)["canonical"] == 1.0


def test_episodes_and_collection_are_deterministic():
    assert [make_episode(s) for s in SEEDS] == [make_episode(s) for s in SEEDS]
    assert collect(100, seed=3) == collect(100, seed=3)
    assert collect(100, seed=3) != collect(100, seed=4)
    env_a, env_b = ClarifyEnv(seed=9), ClarifyEnv(seed=9)
    assert [env_a.reset() for _ in range(5)] == [env_b.reset() for _ in range(5)]


def test_seed_streams_are_disjoint():
    logged = set(episode_seeds(5000, 0, "collect")) | set(episode_seeds(5000, 1, "collect"))
    held_out = set(episode_seeds(5000, 0, "eval")) | set(episode_seeds(5000, 1, "eval"))
    assert not logged & held_out and len(logged) == len(held_out) == 10_000
    ids = {r["id"] for r in collect(50, seed=0)}
    assert ids == {f"clarify-{s}" for s in episode_seeds(50, 0, "collect")}


def test_optimal_beats_answering_at_once():
    optimal = evaluate(OPTIMAL, n_episodes=300, progress=False)
    hasty = evaluate(AnswerAtOncePolicy(seed=0), n_episodes=300, progress=False)
    assert optimal["mean_reward"] == 1.0 and optimal["questions"] == 1.0 and optimal["well_formed"] == 1.0
    assert 0.15 < hasty["mean_reward"] < 0.35 and hasty["questions"] == 0.0  # ~1/4
    two = evaluate(AnswerAtOncePolicy(), n_episodes=300, config=ClarifyConfig(n_candidates=2), progress=False)
    assert 0.4 < two["mean_reward"] < 0.6


def test_behavior_policy_is_a_mediocre_mixture():
    stats = summarize(collect(2000, seed=0))
    assert 0.3 <= stats["mean_reward"] <= 0.55, stats
    moves = stats["first_move"]
    assert set(moves) == {"guess", "informative", "useless", "malformed"}
    # A premature guess is the single most common first move (what greedy behaviour cloning copies),
    # while ask-then-answer-right is common enough for reward weighting to find.
    assert moves["guess"] > 0.5 * stats["n"]
    assert 0.25 <= stats["ask_then_correct"] / stats["n"] <= 0.45
    assert 0.9 < stats["well_formed"] < 1.0


def test_behavior_policy_reads_the_visible_state_right():
    careful = BehaviorPolicy(p_hasty=0.0, p_informative=1.0, p_correct=1.0, p_malformed=0.0)
    assert evaluate(careful, n_episodes=200, progress=False)["mean_reward"] == 1.0
    state = read_state(ClarifyEnv().reset(7))
    assert state.attribute == make_episode(7).attribute and state.turn == 0 and state.max_turns == 3


def test_evaluate_batched_matches_and_scores_garbage():
    policy = BehaviorPolicy(seed=2)
    plain = evaluate(policy, n_episodes=100, seed=1, progress=False)
    batched = evaluate(lambda batch: [policy(m) for m in batch], n_episodes=100, seed=1, batched=True,
                       progress=False)
    assert plain == batched
    assert set(plain) >= {"mean_reward", "stderr", "accuracy", "questions", "well_formed", "n"}
    garbage = evaluate(lambda m: "blah", n_episodes=20, progress=False)
    assert garbage["mean_reward"] == 0.0 and garbage["well_formed"] == 0.0 and garbage["turns"] == 3.0
    with pytest.raises(ValueError):
        evaluate(lambda batch: [], n_episodes=5, batched=True, progress=False)


def test_vocabulary_covers_everything_said():
    vocab = set(vocabulary())
    assert len(vocab) < 300
    records = collect(500, seed=1)
    said = {w for r in records for m in r["messages"] for w in m["content"].split()}
    assert said <= vocab
    assert set(" ".join(corpus(10)).split()) == vocab
    assert all(m["content"] == " ".join(m["content"].split()) for r in records for m in r["messages"])
    # Whole conversations are short (word tokens).
    assert max(sum(len(m["content"].split()) for m in r["messages"]) for r in records) <= 80


def _check_jsonl(path, n):
    lines = open(path, encoding="utf-8").read().splitlines()
    assert len(lines) == n
    ids = set()
    for line in lines:
        record = json.loads(line)
        assert set(record) == {"id", "messages", "reward"}
        assert isinstance(record["id"], str) and record["id"] not in ids
        ids.add(record["id"])
        assert record["reward"] in (0.0, 1.0) and isinstance(record["reward"], float)
        roles = [m["role"] for m in record["messages"]]
        assert roles[:2] == ["system", "user"] and "assistant" in roles
        assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in record["messages"])
        assert all(a != b for a, b in zip(roles[1:], roles[2:]))  # user and assistant alternate


def test_collect_writes_valid_jsonl(tmp_path):
    records = collect(30, seed=2)
    path = tmp_path / "sub" / "logged.jsonl"
    write_jsonl(records, str(path))
    _check_jsonl(path, 30)
    assert read_jsonl(str(path)) == records


def test_collect_cli(tmp_path, capsys):
    from refit_fast.cli import main

    out = tmp_path / "logged.jsonl"
    assert main(["collect", "--n", "40", "--out", str(out), "--seed", "1"]) == 0
    _check_jsonl(out, 40)
    printed = capsys.readouterr().out
    assert "mean reward" in printed and "40 conversations" in printed
    with pytest.raises(SystemExit):
        main(["collect", "--n", "5", "--out", str(out), "--n-candidates", "9"])


def test_config_validation():
    for bad in (dict(n_candidates=1), dict(n_candidates=5), dict(max_turns=0), dict(p_mention_shared=2.0)):
        with pytest.raises(ValueError):
            ClarifyConfig(**bad)
    with pytest.raises(ValueError):
        ClarifyEnv(ClarifyConfig(), max_turns=2)
