"""Roll policies out in the clarifying-QA environment and score them on held-out episodes.

Episode seeds come from two disjoint streams: logged data (`collect`) uses even episode seeds,
evaluation uses odd ones (`episode_seeds`), so no evaluation episode is ever a logged episode's
draw. (The world is small, so an evaluation scene can still look like some logged scene by chance;
the hidden item is drawn independently either way.)

    >>> from refit_fast.envs.policies import OPTIMAL
    >>> evaluate(OPTIMAL, n_episodes=50, progress=False)["mean_reward"]
    1.0
"""
from __future__ import annotations

import math
from collections.abc import Callable

from refit_fast.envs.clarify import ClarifyConfig, ClarifyEnv

Policy = Callable[[list[dict]], str]
STREAMS = {"collect": 0, "eval": 1}
_MAX_INDEX = 2**32


def episode_seeds(n: int, seed: int = 0, stream: str = "eval") -> list[int]:
    """The `n` episode seeds of `stream` ('collect': even, 'eval': odd) for run seed `seed`.

    Seed i of run `seed` is `2 * (seed * 2**32 + i) + parity`: distinct runs and streams never share
    an episode seed.

    Example:
        >>> episode_seeds(3, seed=0, stream="eval"), episode_seeds(3, seed=0, stream="collect")
        ([1, 3, 5], [0, 2, 4])
    """
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {sorted(STREAMS)}, got {stream!r}")
    if not 0 <= n <= _MAX_INDEX or seed < 0:
        raise ValueError(f"need 0 <= n <= 2**32 and seed >= 0, got n={n}, seed={seed}")
    return [2 * (seed * _MAX_INDEX + i) + STREAMS[stream] for i in range(n)]


def rollout(policy: Policy, episode_seed: int, config: ClarifyConfig | None = None):
    """Play one episode; returns `(messages, reward, infos)` with one `info` per agent turn.

    A policy that raises is not caught (that is a bug in the policy); a policy that returns
    anything else is parsed leniently and, if unreadable, wastes the turn.

    Example:
        >>> from refit_fast.envs.policies import OPTIMAL
        >>> messages, reward, infos = rollout(OPTIMAL, episode_seed=1)
        >>> reward, [i["kind"] for i in infos]
        (1.0, ['question', 'answer'])
    """
    env = ClarifyEnv(config or ClarifyConfig())
    env.reset(episode_seed)
    infos, done, reward = [], False, 0.0
    while not done:
        _, done, reward, info = env.step(policy([dict(m) for m in env.messages]))
        infos.append(info)
    return env.messages, reward, infos


def evaluate(
    policy: Policy,
    n_episodes: int = 500,
    seed: int = 0,
    *,
    config: ClarifyConfig | None = None,
    batched: bool = False,
    progress: bool = True,
) -> dict:
    """Mean reward (with standard error) and behaviour statistics of `policy` on held-out episodes.

    Episodes are `episode_seeds(n_episodes, seed, "eval")`: fixed for a given `seed`, disjoint from
    every logged episode. With `batched=True`, `policy` takes a list of conversations and returns a
    list of texts (all unfinished episodes advance one turn per call: one batched generate per turn).

    The reward is `config.reward`'s (default graded, in [0, 1]; `ClarifyConfig(reward="binary")` for
    0/1); the paper reports exact-match accuracy beside it.

    Returns: `mean_reward`; `stderr` (sample std / sqrt(n)); `accuracy` (fraction of episodes whose
    final answer names the hidden item: exact match per episode, no answer counts as wrong);
    `accuracy_stderr` (its sample std / sqrt(n)); `answered` (fraction of episodes that named an
    item); `questions` and `questions_per_episode` (the same number: well-formed questions per
    episode); `informative` (fraction of episodes that asked the attribute the items differ in);
    `well_formed` (fraction of agent turns that parse as a question or an answer); `canonical`
    (fraction said exactly in the logged policy's words: catches rambling that still parses); `turns` (agent
    turns per episode); `n`.

    Example:
        >>> from refit_fast.envs.policies import AnswerAtOncePolicy
        >>> r = evaluate(AnswerAtOncePolicy(), n_episodes=200, progress=False)
        >>> 0.15 < r["accuracy"] < 0.35, abs(r["mean_reward"] - (0.2 + 0.6 * r["accuracy"])) < 1e-9, r["questions"]
        (True, True, 0.0)
    """
    config = config or ClarifyConfig()
    played = play(policy, episode_seeds(n_episodes, seed, "eval"), config=config, batched=batched,
                  progress=progress, desc="evaluate")
    return _scores([env.reward for env, _ in played], [infos for _, infos in played])


def play(policy: Policy, seeds, *, config: ClarifyConfig | None = None, batched: bool = False,
         progress: bool = False, desc: str = "play") -> list[tuple[ClarifyEnv, list[dict]]]:
    """Play one episode per seed to its end; returns `[(env, infos)]` in seed order, where
    `env.messages` is the conversation, `env.reward` its reward and `infos` one dict per agent turn.

    With `batched=True`, `policy` takes a list of conversations and returns a list of texts: every
    unfinished episode advances one turn per call (one batched generate per turn for a model).
    `evaluate` and `collect` both play through here.

    Example:
        >>> from refit_fast.envs.policies import OPTIMAL
        >>> [(env.reward, len(infos)) for env, infos in play(OPTIMAL, [1, 3])]
        [(1.0, 2), (1.0, 2)]
    """
    config = config or ClarifyConfig()
    envs = [ClarifyEnv(config) for _ in seeds]
    for env, s in zip(envs, seeds):
        env.reset(s)
    infos: list[list[dict]] = [[] for _ in envs]
    bar = _progress_bar(len(envs), progress, desc)
    if batched:
        active = list(range(len(envs)))
        while active:
            texts = policy([[dict(m) for m in envs[i].messages] for i in active])
            if len(texts) != len(active):
                raise ValueError(f"batched policy returned {len(texts)} texts for {len(active)} conversations")
            for i, text in zip(active, texts):
                infos[i].append(envs[i].step(text)[3])
            finished = [i for i in active if envs[i].done]
            bar.update(len(finished))
            active = [i for i in active if not envs[i].done]
    else:
        for env, episode_infos in zip(envs, infos):
            while not env.done:
                episode_infos.append(env.step(policy([dict(m) for m in env.messages]))[3])
            bar.update(1)
    bar.close()
    return list(zip(envs, infos))


def _scores(rewards: list[float], infos: list[list[dict]]) -> dict:
    n = len(rewards)
    if n == 0:
        raise ValueError("no episodes to score")
    mean = math.fsum(rewards) / n  # fsum: exact sum, so the mean does not depend on episode order
    var = math.fsum((r - mean) ** 2 for r in rewards) / (n - 1) if n > 1 else 0.0
    turns = [i for episode in infos for i in episode]
    answers = [i for i in turns if i["kind"] == "answer"]
    right = sum(any(i["correct"] for i in episode) for episode in infos)  # only a final answer is correct
    accuracy = right / n
    accuracy_var = (right * (1 - accuracy) ** 2 + (n - right) * accuracy**2) / (n - 1) if n > 1 else 0.0
    questions = sum(i["kind"] == "question" for i in turns) / n
    return {
        "mean_reward": mean,
        "stderr": math.sqrt(var / n),
        "accuracy": accuracy,
        "accuracy_stderr": math.sqrt(accuracy_var / n),
        "answered": len(answers) / n,
        "questions": questions,
        "questions_per_episode": questions,
        "informative": sum(any(i["informative"] for i in episode) for episode in infos) / n,
        "well_formed": sum(i["well_formed"] for i in turns) / len(turns),
        "canonical": sum(i["canonical"] for i in turns) / len(turns),
        "turns": len(turns) / n,
        "n": n,
    }


def _progress_bar(total: int, enabled: bool, desc: str):
    # tqdm is imported lazily so `import refit_fast.envs` stays light.
    if enabled:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="ep", mininterval=0.5)

    class _Null:
        def update(self, n=1):
            pass

        def close(self):
            pass

    return _Null()
