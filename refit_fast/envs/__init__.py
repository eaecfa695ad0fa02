"""The clarifying-QA environment: a seeded text simulator, scripted policies, logging and evaluation.

    from refit_fast.envs import ClarifyEnv, BehaviorPolicy, OPTIMAL, collect, write_jsonl, evaluate
    records = collect(3000, seed=0)              # logged behaviour-policy conversations with rewards
    write_jsonl(records, "logged.jsonl")         # the data layer's {id, messages, reward} JSONL
    evaluate(OPTIMAL, n_episodes=500)            # {'mean_reward': 1.0, 'stderr': 0.0, 'accuracy': 1.0, ...}

Rewards are graded by default (a judge-like score in [0, 1]: the right item dominates, play quality
adds partial credit; `graded_reward`), or 0/1 with `ClarifyConfig(reward="binary")`.

No torch here: a policy is any callable `messages -> str`.
"""
from refit_fast.envs.clarify import (
    ATTRIBUTES,
    KINDS,
    ClarifyConfig,
    ClarifyEnv,
    Episode,
    Turn,
    corpus,
    graded_reward,
    make_episode,
    normalize,
    parse_turn,
    vocabulary,
)
from refit_fast.envs.collect import collect, read_jsonl, summarize, write_jsonl
from refit_fast.envs.evaluate import episode_seeds, evaluate, play, rollout
from refit_fast.envs.policies import (
    OPTIMAL,
    AnswerAtOncePolicy,
    BehaviorPolicy,
    OptimalPolicy,
    VisibleState,
    read_state,
)

__all__ = [
    "ATTRIBUTES", "KINDS", "ClarifyConfig", "ClarifyEnv", "Episode", "Turn", "corpus", "graded_reward",
    "make_episode", "normalize", "parse_turn", "vocabulary", "collect", "read_jsonl", "summarize", "write_jsonl",
    "episode_seeds", "evaluate", "play", "rollout", "OPTIMAL", "AnswerAtOncePolicy", "BehaviorPolicy",
    "OptimalPolicy", "VisibleState", "read_state",
]
