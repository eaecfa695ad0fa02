"""The clarifying-QA environment: rules, truthful user, horizon, malformed turns, the graded and
binary rewards, determinism, the scripted policies, evaluation, and `refit-fast collect`. Pure
Python, a few seconds."""
import ast
import hashlib
import json
import math
import pathlib
import random
import statistics

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
from refit_fast.envs.clarify import NOT_UNDERSTOOD, SUCCESS_THRESHOLD, graded_reward

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


@pytest.mark.parametrize("mode, right, wrong", [("graded", 0.8, 0.2), ("binary", 1.0, 0.0)])
def test_rewards_correct_wrong_ambiguous(mode, right, wrong):
    # An answer on the first turn: graded pays 0.6 + 0.4 * 0.5 when right, 0.4 * 0.5 otherwise.
    for s in SEEDS:
        ep = make_episode(s)
        wrong_item = next(i for i in range(len(ep.options)) if i != ep.target)
        other_kind = next(k for k in KINDS if k != ep.kind)
        shared_attr = next(iter(ep.shared))
        cases = {
            f"it is the {ep.item_name()} .": True,
            f"{ep.options[ep.target]}": True,
            f"it is the {ep.shared[shared_attr]} {ep.item_name()} .": True,  # extra true detail is fine
            f"it is the {ep.item_name(wrong_item)} .": False,
            f"it is the {ep.options[ep.target]} {other_kind} .": False,  # wrong kind of item
            f"it is the {ep.shared[shared_attr]} {ep.kind} .": False,  # ambiguous: fits every item
            f"it is the {_other_value(ep, shared_attr)} {ep.item_name()} .": False,  # contradicts a fact
        }
        for text, correct in cases.items():
            env = ClarifyEnv(reward=mode)
            env.reset(s)
            reply, done, reward, info = env.step(text)
            assert (reply, done, reward) == (None, True, right if correct else wrong), text
            assert info["kind"] == "answer" and info["well_formed"] and info["correct"] == correct
            assert not info["wasted"] and env.reward == reward


def _play(episode_seed, turns, **config):
    """Play scripted turns; each is a text or a function of the episode. Returns (rewards, infos, env)."""
    env = ClarifyEnv(**config)
    env.reset(episode_seed)
    rewards, infos = [], []
    for turn in turns:
        _, done, reward, info = env.step(turn(env.episode) if callable(turn) else turn)
        rewards.append(reward)
        infos.append(info)
        if done:
            break
    assert env.done, "the script must end the episode"
    return rewards, infos, env


def _ask(ep):  # the informative question
    return f"what {ep.attribute} is it ?"


def _useless(ep, k=0):
    return f"what {sorted(ep.shared)[k]} is it ?"


def _useless2(ep):
    return _useless(ep, 1)


def _right(ep):
    return f"it is the {ep.item_name()} ."


def _wrong(ep):
    return f"it is the {ep.item_name((ep.target + 1) % len(ep.options))} ."


def _ambiguous(ep):
    return f"it is the {next(iter(ep.shared.values()))} {ep.kind} ."


GRADED_CASES = {  # (max_turns, script) -> the documented graded reward, exactly
    "optimal play": (3, [_ask, _right], 1.0),
    "lucky answer at once": (3, [_right], 0.8),
    "wrong answer at once": (3, [_wrong], 0.2),
    "informative then wrong": (3, [_ask, _wrong], 0.4),
    "useless, informative, right": (3, [_useless, _ask, _right], 0.933333),  # 0.6 + 0.4 * (0.5 + 0.5 * 2/3)
    "informative, useless, right": (3, [_ask, _useless, _right], 0.933333),
    "malformed, informative, right": (3, ["hmm", _ask, _right], 0.933333),
    "malformed, right": (3, ["ok .", _right], 0.733333),  # 0.6 + 0.4 * 0.5 * 2/3
    "two malformed, right": (3, ["ok .", "hmm", _right], 0.666667),  # 0.6 + 0.4 * 0.5 * 1/3
    "repeated informative, right": (3, [_ask, _ask, _right], 0.933333),
    "useless twice (repeated), right": (3, [_useless, _useless, _right], 0.666667),
    "two useless, right": (3, [_useless, _useless2, _right], 0.666667),
    "useless, wrong": (3, [_useless, _wrong], 0.133333),  # 0.4 * 0.5 * 2/3
    "ambiguous at once": (3, [_ambiguous], 0.2),
    "informative then ambiguous": (3, [_ask, _ambiguous], 0.4),
    "out of turns: informative, then two wasted": (3, [_ask, _useless, _ask], 0.266667),  # 0.4 * (0.5 + 1/6)
    "out of turns: informative thrice": (3, [_ask, _ask, _ask], 0.266667),
    "out of turns: informative only on the last turn": (3, [_useless, _useless2, _ask], 0.066667),  # 0.4 * 1/6
    "out of turns: all malformed": (3, ["hmm", "", None], 0.0),
    "one turn: informative question, no answer": (1, [_ask], 0.2),  # heard too late to use: no credit
    "one turn: useless question": (1, [_useless], 0.0),
    "one turn: lucky answer": (1, [_right], 0.8),
    "two turns: informative, right": (2, [_ask, _right], 1.0),
    "two turns: useless, right": (2, [_useless, _right], 0.7),  # 0.6 + 0.4 * 0.5 * 1/2
    "five turns: two malformed, informative, right": (5, ["ok .", "hmm", _ask, _right], 0.92),  # 0.6 + 0.4 * 0.8
}


@pytest.mark.parametrize("case", list(GRADED_CASES))
def test_graded_reward_documented_cases(case):
    max_turns, script, expected = GRADED_CASES[case]
    for s in range(40):
        rewards, infos, env = _play(s, script, max_turns=max_turns)
        assert len(rewards) == len(script)
        assert rewards[-1] == expected and env.reward == expected, (case, s, rewards)
        assert all(r == 0.0 for r in rewards[:-1])  # the reward arrives on the final step only
        assert infos[-1]["correct"] == (expected >= 0.6)
        assert (expected > SUCCESS_THRESHOLD) == infos[-1]["correct"]
        # Binary mode pays the same play 0/1.
        binary, _, _ = _play(s, script, max_turns=max_turns, reward="binary")
        assert binary == [0.0] * (len(script) - 1) + [float(infos[-1]["correct"])]


def test_graded_reward_flags_each_wasted_turn_once():
    _, infos, _ = _play(4, [_useless, _useless, _ask, _ask, "ok .", _right], max_turns=6)
    assert [i["wasted"] for i in infos] == [True, True, False, True, True, False]
    assert [i["informative"] for i in infos] == [False, False, True, True, False, False]


def test_graded_reward_function():
    for max_turns in range(1, 7):
        for wasted in range(max_turns + 1):
            for informative in (False, True):
                q = 0.5 * informative + 0.5 * (1 - wasted / max_turns)
                for correct in (False, True):
                    r = graded_reward(correct, informative, wasted, max_turns)
                    assert r == round((0.6 if correct else 0.0) + 0.4 * q, 6)
                    assert (0.6 <= r <= 1.0) if correct else (0.0 <= r <= 0.4)
    assert graded_reward(True, True, 0, 3) == 1.0 and graded_reward(False, False, 3, 3) == 0.0
    for bad in ((-1, 3), (4, 3), (0, 0)):
        with pytest.raises(ValueError):
            graded_reward(True, True, *bad)


def _expected_graded(ep, infos, max_turns):
    """The documented rule, recomputed from the turn log (independently of the environment's code)."""
    asked, wasted = [], 0
    for i in infos:
        if i["kind"] == "malformed":
            wasted += 1
        elif i["kind"] == "question":
            wasted += i["attribute"] != ep.attribute or i["attribute"] in asked
            asked.append(i["attribute"])
    informative = any(i["kind"] == "question" and i["attribute"] == ep.attribute for i in infos[:-1])
    q = 0.5 * informative + 0.5 * (1 - wasted / max_turns)
    return round((0.6 if infos[-1]["correct"] else 0.0) + 0.4 * q, 6)


class _RandomPolicy:
    """Uniformly random turns: questions (informative, useless, repeated), answers of every kind, junk."""

    def __init__(self, seed):
        self.rng = random.Random(seed)

    def __call__(self, messages):
        state = read_state(messages)
        kind = state.kind or "ball"
        choices = [f"what {a} is it ?" for a in ATTRIBUTES] + ["hmm", "", "is it red ?"]
        choices += [f"it is the {v} {kind} ." for v in state.options] + [f"it is the {kind} {kind} red blue"]
        return self.rng.choice(choices)


def test_graded_right_always_beats_wrong_over_random_play():
    configs = [ClarifyConfig(), ClarifyConfig(n_candidates=2, max_turns=1),
               ClarifyConfig(n_candidates=3, max_turns=2), ClarifyConfig(max_turns=5, p_mention_shared=1.0)]
    for c, config in enumerate(configs):
        policies = [BehaviorPolicy(seed=c, config=config),
                    BehaviorPolicy(seed=c, config=config, p_malformed=0.4), _RandomPolicy(seed=c)]
        for p, policy in enumerate(policies):
            right, wrong = [], []
            for s in episode_seeds(300, seed=10 * c + p):
                _, reward, infos = rollout(policy, s, config)
                assert reward == _expected_graded(make_episode(s, config), infos, config.max_turns)
                (right if infos[-1]["correct"] else wrong).append(reward)
            assert right and wrong
            assert min(right) >= 0.6 > SUCCESS_THRESHOLD > 0.4 >= max(wrong), (c, p)
            if config.max_turns > 1:  # play quality separates conversations with the same outcome
                assert len(set(right)) > 1 and len(set(wrong)) > 1, (c, p)


def test_not_answering_never_pays_more_than_guessing_in_expectation():
    # The best play without an answer: the informative question, then wasted turns (at T = 1 the
    # question is the final turn, so it earns no informative credit).
    for max_turns in range(1, 7):
        stall = {_play(s, [_ask] + [_useless] * (max_turns - 1), max_turns=max_turns)[0][-1] for s in range(20)}
        assert stall == {graded_reward(False, max_turns > 1, max_turns - 1, max_turns)}
        for n_candidates in (2, 3, 4):
            right, wrong = graded_reward(True, False, 0, max_turns), graded_reward(False, False, 0, max_turns)
            guess = (right + (n_candidates - 1) * wrong) / n_candidates  # answering at once, in expectation
            assert max(stall) <= 0.3 < 0.35 <= guess, (max_turns, n_candidates)


# Rewards of binary mode, pinned from the implementation before the graded reward existed (the 0/1 rule
# it kept): sha256 of the JSON list of reward lists built in test_binary_mode_is_the_old_0_1_reward.
OLD_BINARY_DIGEST = "a606cec95ab72a2a9203bf87ecdb8f0a2c98ac854c810de2878e88654fcdf0ff"


def test_binary_mode_is_the_old_0_1_reward():
    out = []
    for fields in (dict(), dict(n_candidates=2, max_turns=1), dict(n_candidates=3, max_turns=5)):
        config = ClarifyConfig(**fields, reward="binary")
        out.append([r["reward"] for r in collect(1000, seed=2, config=config, per_episode=2)])
        policy = BehaviorPolicy(seed=5, p_malformed=0.3, config=config)
        out.append([rollout(policy, s, config)[1] for s in episode_seeds(500, 3)])
    assert [sum(x) for x in out] == [455.0, 191.0, 488.0, 166.0, 533.0, 291.0]
    assert hashlib.sha256(json.dumps(out).encode()).hexdigest() == OLD_BINARY_DIGEST
    # The reward mode changes the rewards only: same conversations, and right <=> graded > 0.5.
    graded = collect(500, seed=2)
    binary = collect(500, seed=2, config=ClarifyConfig(reward="binary"))
    assert [r["messages"] for r in graded] == [r["messages"] for r in binary]
    assert [float(g["reward"] > 0.5) for g in graded] == [b["reward"] for b in binary]
    assert {b["reward"] for b in binary} == {0.0, 1.0} and len({g["reward"] for g in graded}) > 4


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
        env = ClarifyEnv(max_turns=max_turns, reward="binary")
        env.reset(11)
        for t in range(max_turns):
            reply, done, reward, info = env.step("what color is it ?")
            assert info["turn"] == t and reward == 0.0  # running out of turns pays 0 in binary mode
            assert done == (t == max_turns - 1)
            assert (reply is None) == done
        assert sum(m["role"] == "assistant" for m in env.messages) == max_turns
        assert env.messages[-1]["role"] == "assistant"  # the log ends on the agent's turn
        with pytest.raises(RuntimeError):
            env.step("it is the red ball .")
    # An answer on the last turn still counts.
    for mode, expected in (("binary", 1.0), ("graded", 1.0)):
        env = ClarifyEnv(max_turns=2, reward=mode)
        env.reset(3)
        env.step(f"what {env.episode.attribute} is it ?")
        assert env.step(f"it is the {env.episode.item_name()} .")[1:3] == (True, expected)


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


def test_phrases_live_in_one_module():
    """The simulator and the policies share envs/phrases.py; neither spells a template out itself."""
    from refit_fast.envs import clarify, phrases, policies

    for name in ("QUESTION", "ANSWER", "ATTRIBUTES", "KINDS", "VALUE_TO_ATTRIBUTE"):
        for module in (clarify, policies):
            if hasattr(module, name):
                assert getattr(module, name) is getattr(phrases, name), (module.__name__, name)
    assert policies.MALFORMED_TURNS is phrases.MALFORMED_TURNS and clarify.NOT_UNDERSTOOD is phrases.NOT_UNDERSTOOD
    for module in (clarify, policies):
        tree = ast.parse(pathlib.Path(module.__file__).read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                      and isinstance(node.body[0], ast.Expr)}
        literals = {node.value for node in ast.walk(tree)
                    if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings}
        assert not literals & set(phrases.all_phrases() + ["tiny", "ball"]), module.__name__
    # What the policies say is what the environment calls canonical, word for word.
    env = ClarifyEnv()
    env.reset(7)
    assert env.step(phrases.QUESTION.format(attribute="color"))[3]["canonical"]
    assert env.step(phrases.ANSWER.format(value="yellow", kind="book"))[3]["canonical"]


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
    assert optimal["mean_reward"] == 1.0 and optimal["accuracy"] == 1.0 and optimal["accuracy_stderr"] == 0.0
    assert optimal["questions"] == optimal["questions_per_episode"] == 1.0 and optimal["well_formed"] == 1.0
    assert 0.15 < hasty["accuracy"] < 0.35 and hasty["questions"] == 0.0  # ~1/4
    # Every answer at once pays 0.8 (right) or 0.2 (wrong).
    assert math.isclose(hasty["mean_reward"], 0.2 + 0.6 * hasty["accuracy"], abs_tol=1e-12)
    two = evaluate(AnswerAtOncePolicy(), n_episodes=300, config=ClarifyConfig(n_candidates=2), progress=False)
    assert 0.4 < two["accuracy"] < 0.6
    binary = evaluate(AnswerAtOncePolicy(seed=0), n_episodes=300, config=ClarifyConfig(reward="binary"),
                      progress=False)
    assert binary["mean_reward"] == binary["accuracy"] == hasty["accuracy"]


def test_behavior_policy_is_a_mediocre_mixture():
    stats = summarize(collect(2000, seed=0))
    assert 0.3 <= stats["accuracy"] <= 0.55 and 0.45 <= stats["mean_reward"] <= 0.62, stats
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
    assert set(plain) == {"mean_reward", "stderr", "accuracy", "accuracy_stderr", "answered", "questions",
                          "questions_per_episode", "informative", "well_formed", "canonical", "turns", "n"}
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


def _check_jsonl(path, n, binary=False):
    lines = open(path, encoding="utf-8").read().splitlines()
    assert len(lines) == n
    ids, rewards = set(), []
    for line in lines:
        record = json.loads(line)
        assert set(record) == {"id", "messages", "reward"}
        assert isinstance(record["id"], str) and record["id"] not in ids
        ids.add(record["id"])
        reward = record["reward"]
        assert isinstance(reward, float) and 0.0 <= reward <= 1.0 and round(reward, 6) == reward
        assert not binary or reward in (0.0, 1.0)
        rewards.append(reward)
        roles = [m["role"] for m in record["messages"]]
        assert roles[:2] == ["system", "user"] and "assistant" in roles
        assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in record["messages"])
        assert all(a != b for a, b in zip(roles[1:], roles[2:]))  # user and assistant alternate
    return rewards


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
    graded = _check_jsonl(out, 40)
    assert graded == [r["reward"] for r in collect(40, seed=1)]  # graded by default
    assert not set(graded) <= {0.0, 1.0}
    printed = capsys.readouterr().out
    assert "mean reward" in printed and "40 conversations" in printed and "(graded); accuracy" in printed
    assert main(["collect", "--n", "40", "--out", str(out), "--seed", "1", "--reward", "binary"]) == 0
    binary = _check_jsonl(out, 40, binary=True)
    assert binary == [r["reward"] for r in collect(40, seed=1, config=ClarifyConfig(reward="binary"))]
    assert binary == [float(g > 0.5) for g in graded]
    assert "(binary); accuracy" in capsys.readouterr().out
    assert main(["collect", "--n", "40", "--out", str(out), "--reward", "graded", "--quiet"]) == 0
    for bad in (["--n-candidates", "9"], ["--reward", "judge"]):
        with pytest.raises(SystemExit):
            main(["collect", "--n", "5", "--out", str(out), *bad])


def _hide_some(policy, kinds):
    """`policy`, except it rambles (never answers) in scenes of the given kinds."""
    def play(messages):
        return "hmm" if read_state(messages).kind in kinds else policy(messages)
    return play


def test_accuracy_is_per_episode_with_its_stderr():
    n, kinds = 400, {"ball", "cup", "box"}
    expected = [make_episode(s).kind not in kinds for s in episode_seeds(n, 0)]
    for policy in (_hide_some(OPTIMAL, kinds), _hide_some(AnswerAtOncePolicy(seed=1), kinds)):
        r = evaluate(policy, n_episodes=n, progress=False)
        right = [rollout(policy, s)[2][-1]["correct"] for s in episode_seeds(n, 0)]
        assert r["accuracy"] == sum(right) / n  # per episode: an episode with no answer counts as wrong
        assert r["accuracy_stderr"] == pytest.approx(statistics.stdev(right) / math.sqrt(n), rel=1e-12)
        assert r["answered"] == sum(expected) / n < 1.0
    # OPTIMAL answers right whenever it answers: correct answers / answers given would be 1.0.
    r = evaluate(_hide_some(OPTIMAL, kinds), n_episodes=n, progress=False)
    assert r["accuracy"] == sum(expected) / n == r["answered"]
    assert 0.0 < r["accuracy"] < 1.0 and r["accuracy_stderr"] > 0.0
    # Behaviour policy: accuracy and its stderr are those of the 0/1 rewards of binary mode.
    b = evaluate(BehaviorPolicy(seed=3), n_episodes=300, config=ClarifyConfig(reward="binary"), progress=False)
    g = evaluate(BehaviorPolicy(seed=3), n_episodes=300, progress=False)
    assert b["accuracy"] == b["mean_reward"] == g["accuracy"] and g["mean_reward"] > g["accuracy"]
    assert b["accuracy_stderr"] == pytest.approx(b["stderr"], rel=1e-12) == g["accuracy_stderr"]
    assert {k: v for k, v in b.items() if k not in ("mean_reward", "stderr")} == \
        {k: v for k, v in g.items() if k not in ("mean_reward", "stderr")}
    one = evaluate(OPTIMAL, n_episodes=1, progress=False)
    assert one["accuracy"] == 1.0 and one["accuracy_stderr"] == 0.0


def test_summarize_counts_right_answers_not_positive_rewards():
    graded = collect(600, seed=4)
    binary = collect(600, seed=4, config=ClarifyConfig(reward="binary"))
    g, b = summarize(graded), summarize(binary)
    right = sum(r["reward"] for r in binary)  # binary rewards are exactly "the answer was right"
    assert g["successes"] == b["successes"] == right and g["accuracy"] == b["accuracy"] == right / 600
    assert sum(r["reward"] > 0 for r in graded) > right  # wrong conversations earn partial credit
    assert g["ask_then_correct"] == b["ask_then_correct"] > 0
    assert b["mean_reward"] == b["accuracy"] and g["mean_reward"] > g["accuracy"]
    assert {k: v for k, v in g.items() if k not in ("mean_reward", "stderr")} == \
        {k: v for k, v in b.items() if k not in ("mean_reward", "stderr")}
    assert summarize([])["accuracy"] == 0.0


def test_config_validation():
    for bad in (dict(n_candidates=1), dict(n_candidates=5), dict(max_turns=0), dict(p_mention_shared=2.0),
                dict(reward="judge"), dict(reward="Graded")):
        with pytest.raises(ValueError):
            ClarifyConfig(**bad)
    with pytest.raises(ValueError):
        ClarifyEnv(ClarifyConfig(), max_turns=2)


def test_collect_batched_equals_one_at_a_time():
    """A batched policy advances every episode one turn per call; the records are the same."""
    from refit_fast.envs import AnswerAtOncePolicy, play

    policy = BehaviorPolicy(seed=4)
    calls = []

    def batched(conversations):
        calls.append(len(conversations))
        return [policy(c) for c in conversations]

    assert collect(40, seed=2, policy=batched, batched=True) == collect(40, seed=2, policy=policy)
    assert calls[0] == 40 and len(calls) <= ClarifyConfig().max_turns and calls == sorted(calls, reverse=True)
    with pytest.raises(ValueError, match="batched=True needs a batched policy"):
        collect(3, batched=True)
    played = play(AnswerAtOncePolicy(seed=1), [1, 3, 5])
    assert [len(infos) for _, infos in played] == [1, 1, 1]
    assert [env.episode.seed for env, _ in played] == [1, 3, 5]
    with pytest.raises(ValueError, match="returned 1 texts for 2"):
        play(lambda convs: ["x"], [1, 3], batched=True)


# ---- package layering ------------------------------------------------------------------------------
# Checked on the source (ast), so it covers imports inside functions too and works on whatever modules
# exist at the time: lower stages never reach up, and no two modules import each other, even lazily.

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parents[1] / "refit_fast"
# stage -> the modules it must never import (a prefix covers the package and everything under it)
FORBIDDEN = {
    "refit_fast.envs": ("refit_fast.train", "refit_fast.demo", "refit_fast.apps", "refit_fast.cli"),
    "refit_fast.data": ("refit_fast.train", "refit_fast.envs", "refit_fast.demo", "refit_fast.apps",
                        "refit_fast.cli"),
    "refit_fast.packing": ("refit_fast.train", "refit_fast.demo", "refit_fast.apps", "refit_fast.cli"),
    "refit_fast.ops": ("refit_fast.train", "refit_fast.demo", "refit_fast.apps", "refit_fast.cli"),
    "refit_fast.model": ("refit_fast.train", "refit_fast.demo", "refit_fast.apps", "refit_fast.cli"),
}


def _module_names(root: pathlib.Path) -> dict[str, pathlib.Path | None]:
    """Dotted name -> source file of every module under ``root`` (compiled extensions: None)."""
    names = {}
    for path in sorted(root.rglob("*")):
        if path.suffix not in (".py", ".so", ".pyd") or "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(root.parent).parts)
        parts[-1] = parts[-1].split(".")[0]  # foo.py, _ext.cpython-311-x86_64-linux-gnu.so
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path if path.suffix == ".py" else None
    return names


def _imports(name: str, path: pathlib.Path, modules, top: str) -> set[str]:
    """The modules of package ``top`` that ``name`` imports anywhere in its source (top level or inside
    functions)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            # `from pkg import sub` imports the submodule when there is one, else names of pkg itself
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        out.update(t for t in targets if t == top or t.startswith(top + "."))
    out.discard(name)
    return out


def import_graph(root: pathlib.Path = PACKAGE_ROOT) -> dict[str, set[str]]:
    """Module of the package at ``root`` -> the modules of that package it imports (compiled extensions
    are leaves)."""
    modules = _module_names(root)
    return {name: _imports(name, path, modules, root.name) for name, path in modules.items() if path}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(groups)


def test_import_graph_helpers_see_function_level_imports_and_cycles(tmp_path):
    graph = import_graph()
    assert "refit_fast.envs.clarify" in graph and "refit_fast.model.attention" in graph
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.sub import a\n")
    (pkg / "_ext.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("import os\nfrom . import b\nfrom pkg import _ext\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..sub.a import g\n    from pkg import thing\n")
    assert import_graph(pkg) == {"pkg": {"pkg.sub.a"}, "pkg.sub": set(), "pkg.sub.a": {"pkg.sub.b", "pkg._ext"},
                                 "pkg.sub.b": {"pkg.sub.a", "pkg"}}
    assert import_cycles(import_graph(pkg)) == [["pkg", "pkg.sub.a", "pkg.sub.b"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_modules():
    assert import_cycles(import_graph()) == []


def test_lower_stages_never_import_upward():
    bad = []
    for module, targets in sorted(import_graph().items()):
        for stage, forbidden in FORBIDDEN.items():
            if module == stage or module.startswith(stage + "."):
                bad += [f"{module} -> {t}" for t in sorted(targets)
                        if any(t == f or t.startswith(f + ".") for f in forbidden)]
    assert bad == []
