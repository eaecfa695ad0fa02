"""Log conversations of a policy (by default the behaviour policy) with their rewards, as JSONL.

`refit-fast collect --n 3000 --out logged.jsonl` writes one object per line in the data layer's
format: `{"id": "...", "messages": [{"role": ..., "content": ...}, ...], "reward": 0.933333}`. The
reward is the environment's graded one by default (in [0, 1], 6 decimals; see `refit_fast.envs.clarify`),
or 0/1 with `--reward binary` / `ClarifyConfig(reward="binary")`.

    >>> records = collect(4, seed=0)
    >>> sorted(records[0]), records[0]["messages"][0]["role"]
    (['id', 'messages', 'reward'], 'system')
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter

from refit_fast.envs.clarify import REWARDS, SUCCESS_THRESHOLD, ClarifyConfig, ClarifyEnv, parse_turn
from refit_fast.envs.evaluate import Policy, _progress_bar, episode_seeds, play
from refit_fast.envs.policies import BehaviorPolicy, read_state


def collect(
    n: int,
    seed: int = 0,
    policy: Policy | None = None,
    *,
    config: ClarifyConfig | None = None,
    progress: bool = False,
    per_episode: int = 1,
    batched: bool = False,
) -> list[dict]:
    """Roll out `policy` (default `BehaviorPolicy(seed)`) on logged episodes; `n` JSONL-ready records.

    Episodes are `episode_seeds(., seed, "collect")` (even seeds, never evaluation episodes); the same
    arguments give the same records. With `per_episode=k` (default behaviour policy only) each episode
    is played k times by differently seeded behaviour policies, so conversations share prompts (what
    DPO pairs need). Ids are `clarify-<episode seed>`, or `clarify-<episode seed>-<j>` when k > 1.
    With `batched=True`, `policy` is a batched one (a list of conversations in, a list of texts
    out, e.g. a `ModelPolicy`) and all episodes advance together, one turn per call.

    Example:
        >>> collect(3, seed=1) == collect(3, seed=1)
        True
        >>> [r["id"] for r in collect(4, seed=1, per_episode=2)]
        ['clarify-8589934592-0', 'clarify-8589934592-1', 'clarify-8589934594-0', 'clarify-8589934594-1']
    """
    config = config or ClarifyConfig()
    if per_episode < 1:
        raise ValueError(f"collect: per_episode must be >= 1, got {per_episode}")
    if per_episode > 1 and policy is not None:
        raise ValueError("collect: per_episode > 1 replays episodes with differently seeded behaviour "
                         "policies; it cannot be combined with a given policy")
    if batched and policy is None:
        raise ValueError("collect: batched=True needs a batched policy (e.g. a ModelPolicy)")
    if policy is not None:
        policies = [policy]
    else:  # seeds of the replays: far apart from each other and from other runs' seeds
        policies = [BehaviorPolicy(seed=seed + 1_000_003 * j, config=config) for j in range(per_episode)]
    if batched:
        seeds = episode_seeds(n, seed, "collect")
        return [{"id": f"clarify-{s}", "messages": [dict(m) for m in env.messages], "reward": float(env.reward)}
                for s, (env, _) in zip(seeds, play(policy, seeds, config=config, batched=True,
                                                   progress=progress, desc="collect"))]
    env = ClarifyEnv(config)
    records = []
    bar = _progress_bar(n, progress, "collect")
    for episode_seed in episode_seeds(math.ceil(n / per_episode), seed, "collect"):
        for j, pol in enumerate(policies):
            if len(records) == n:
                break
            env.reset(episode_seed)
            while not env.done:
                env.step(pol([dict(m) for m in env.messages]))
            rid = f"clarify-{episode_seed}" if per_episode == 1 else f"clarify-{episode_seed}-{j}"
            records.append({"id": rid, "messages": [dict(m) for m in env.messages], "reward": float(env.reward)})
            bar.update(1)
    bar.close()
    return records


def write_jsonl(records: list[dict], path: str) -> None:
    """Write records one JSON object per line (UTF-8), creating parent folders; atomic replace.

    Example:
        >>> write_jsonl(collect(2), "/tmp/clarify_doctest.jsonl")
        >>> sum(1 for _ in open("/tmp/clarify_doctest.jsonl"))
        2
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)  # a crash never leaves a half-written file under the real name


def read_jsonl(path: str) -> list[dict]:
    """Read records written by `write_jsonl` (blank lines skipped).

    Example:
        >>> write_jsonl(collect(2), "/tmp/clarify_doctest.jsonl")
        >>> len(read_jsonl("/tmp/clarify_doctest.jsonl"))
        2
    """
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(records: list[dict]) -> dict:
    """Statistics of logged conversations, read from their text and rewards: reward, right answers,
    first moves, turn kinds.

    `successes` counts conversations whose answer named the hidden item, read off the reward: in both
    reward modes a right conversation scores above `SUCCESS_THRESHOLD` (0.5) and a wrong one below
    (graded: >= 0.6 vs <= 0.4; binary: 1 vs 0). `accuracy` is successes / n; `ask_then_correct`
    counts the right ones that asked the informative question. `first_move` counts 'guess' (an
    answer on the first turn), 'informative' (asks the attribute the items differ in), 'useless'
    (asks another attribute) and 'malformed'.

    Example:
        >>> s = summarize(collect(20)); s["n"], sorted(s["first_move"]) <= ["guess", "informative", "malformed", "useless"]
        (20, True)
    """
    n = len(records)
    rewards = [float(r["reward"]) for r in records]
    mean = math.fsum(rewards) / n if n else 0.0
    var = math.fsum((x - mean) ** 2 for x in rewards) / (n - 1) if n > 1 else 0.0
    first, kinds = Counter(), Counter()
    ask_then_correct = 0
    right = [r > SUCCESS_THRESHOLD for r in rewards]
    for record, is_right in zip(records, right):
        state = read_state(record["messages"])
        agent = [parse_turn(m["content"]) for m in record["messages"] if m["role"] == "assistant"]
        kinds.update(t.kind for t in agent)
        if agent:
            t = agent[0]
            if t.kind == "question":
                first["informative" if t.attribute == state.attribute else "useless"] += 1
            else:
                first["guess" if t.kind == "answer" else "malformed"] += 1
        if state.attribute in state.asked and is_right:
            ask_then_correct += 1
    n_turns = sum(kinds.values())
    return {
        "n": n,
        "mean_reward": mean,
        "stderr": math.sqrt(var / n) if n else 0.0,
        "successes": sum(right),
        "accuracy": sum(right) / n if n else 0.0,
        "ask_then_correct": ask_then_correct,
        "first_move": dict(first),
        "turn_kinds": dict(kinds),
        "well_formed": (n_turns - kinds["malformed"]) / n_turns if n_turns else 0.0,
        "turns_per_conversation": n_turns / n if n else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    """`refit-fast collect --n N --out FILE [--seed S] [--reward graded|binary]`: log behaviour-policy
    conversations as JSONL.

    Example:
        >>> main(["--n", "3", "--out", "/tmp/clarify_doctest.jsonl", "--quiet"])
        0
    """
    parser = argparse.ArgumentParser(
        prog="refit-fast collect",
        description="Log N conversations of the behaviour policy in the clarifying-QA environment, with "
                    "their rewards, as JSONL ({id, messages, reward} per line).")
    parser.add_argument("--n", type=int, required=True, help="number of conversations")
    parser.add_argument("--out", required=True, help="output JSONL path")
    parser.add_argument("--seed", type=int, default=0, help="run seed: episodes and policy randomness (default 0)")
    parser.add_argument("--n-candidates", type=int, default=ClarifyConfig.n_candidates,
                        help=f"items per scene (default {ClarifyConfig.n_candidates})")
    parser.add_argument("--max-turns", type=int, default=ClarifyConfig.max_turns,
                        help=f"agent turns per episode (default {ClarifyConfig.max_turns})")
    parser.add_argument("--per-episode", type=int, default=1,
                        help="conversations per episode, from differently seeded behaviour policies (default 1)")
    parser.add_argument("--reward", choices=REWARDS, default=ClarifyConfig.reward,
                        help="graded: a judge-like score in [0, 1] that also credits play quality; "
                             f"binary: 1 for the right item, else 0 (default {ClarifyConfig.reward})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    args = parser.parse_args(argv)
    if args.n < 1 or args.seed < 0 or args.per_episode < 1:
        parser.error("--n and --per-episode must be >= 1 and --seed >= 0")
    try:
        config = ClarifyConfig(n_candidates=args.n_candidates, max_turns=args.max_turns, reward=args.reward)
    except ValueError as e:
        parser.error(str(e))
    records = collect(args.n, seed=args.seed, config=config, progress=not args.quiet and args.n >= 1000,
                      per_episode=args.per_episode)
    write_jsonl(records, args.out)
    if not args.quiet:
        s = summarize(records)
        moves = ", ".join(f"{k} {v}" for k, v in sorted(s["first_move"].items()))
        print(f"wrote {s['n']} conversations to {args.out}")
        print(f"mean reward {s['mean_reward']:.3f} +- {s['stderr']:.3f} ({args.reward}); accuracy "
              f"{s['accuracy']:.3f} ({s['successes']} right, {s['ask_then_correct']} of them after "
              f"asking the informative question)")
        print(f"first move: {moves}; {s['turns_per_conversation']:.2f} agent turns per conversation, "
              f"{s['well_formed']:.1%} well-formed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
