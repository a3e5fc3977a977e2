"""Steering a model's budgets (batch/limits.py) by what the provider says, and only by evidence.

- A limit the provider states (``x-ratelimit-limit-*`` on any response, or
  "Limit N" in a 429) becomes the model's ceiling at once.
- ``remaining`` at 0 on a success holds the model only until about one unit
  frees, never until the full reset the ``reset`` header announces.
- A 429 is evidence that the limit was reached when it says so (rate-limit
  headers, a stated limit, OpenAI's "Rate limit reached for ... on requests"),
  or when 429s cluster: several in a few seconds, and a good share of the
  answers. Then the whole model pauses for the advised wait and, without a
  stated limit, its rate is cut, once per episode, to what the provider
  demonstrably admitted in the last seconds: repeated cuts cannot compound
  below that. A 429 stating the very limit we already keep (or more) means
  the provider counts it over a shorter window too, where it holds a little
  less (500 rpm counted per second admits 8 a second, 480 a minute): the rate
  is trimmed 3% per episode and probes back up slowly.
- A scattered 429 without such evidence (an upstream provider of OpenRouter
  was busy) says nothing of our rate: only its row waits, as advised.
- After 429s stop, the rate climbs back to the limit found within seconds,
  then probes beyond it slowly, never past a stated limit (a job limit far
  above the real one must not mean a 429 storm every minute).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from batch.limits import ModelLimiter

CLUSTER_SECONDS = 3.0  # 429s within this many seconds may be a cluster ...
CLUSTER_COUNT = 5  # ... when there are at least this many ...
CLUSTER_SHARE = 0.25  # ... and they are at least this share of the answers
EPISODE_SECONDS = 2.0  # evidence closer together than this is one episode: one cut
ADMITTED_MARGIN = 0.97  # of what the provider admitted, after a cut
MEASURE_SECONDS = 10  # what the provider admitted is measured over this many seconds ...
MIN_MEASURE_SECONDS = 3  # ... and not at all over fewer (a cut then halves, and climbs back once calm)
CALM_SECONDS = 3.0  # without evidence, before the rate climbs again
RECOVER_PER_SECOND = 0.10  # of the limit found, back up to it
PROBE_STEP = 0.01  # of the limit found, beyond it ...
PROBE_EVERY = 10.0  # ... every this many seconds
BUDGETS = ("requests", "tokens")


class Steering:
    """One model's view of its provider's limits; the router reports every answer and 429 to it."""

    def __init__(self, limiter: ModelLimiter, requests_per_minute: float | None, tokens_per_minute: float | None,
                 clock: Callable[[], float] | None = None) -> None:
        self.limiter = limiter
        self.clock = clock or limiter.clock
        self.ceiling: dict[str, float | None] = {"requests": requests_per_minute, "tokens": tokens_per_minute}
        self.found: dict[str, float] = {}  # the limit measured when 429s clustered
        self.ring: deque[list[float]] = deque()  # [second, answered, tokens, scattered 429s]
        self.pauses: deque[tuple[float, float]] = deque()  # (from, to) of the pauses 429s ordered, recent ones
        self.last_evidence = -1e9
        self.last_step = -1e9

    # --- what happened -------------------------------------------------------------------------------

    def answered(self, tokens: int) -> None:
        slot = self._slot()
        slot[1] += 1
        slot[2] += tokens
        self._recover()

    def observe(self, limit_requests: float | None, limit_tokens: float | None, remaining_requests: float | None,
                remaining_tokens: float | None, reset_requests: float | None, reset_tokens: float | None) -> None:
        """x-ratelimit-* headers of an answer: adopt stated limits; at remaining 0, hold about one unit."""
        for which, limit in (("requests", limit_requests), ("tokens", limit_tokens)):
            if limit:
                self._adopt(which, limit)
        for which, remaining, reset in (("requests", remaining_requests, reset_requests),
                                        ("tokens", remaining_tokens, reset_tokens)):
            if remaining is not None and remaining <= 0 and reset:
                limit = self.limiter.gate.limit(which)
                unit = 60.0 / limit if limit and which == "requests" else 1.0
                self.limiter.pause(min(reset, unit))  # reset is the time to a *full* reset

    def rate_limited(self, wait: float, *, evidence: bool, scope: str | None, limit_requests: float | None,
                     limit_tokens: float | None) -> bool:
        """A 429; returns True when it is evidence that the model is at its limit (then the model pauses)."""
        now = self.clock()
        if not evidence:
            self._slot()[3] += 1
            evidence = self._clustered(now)
        if not evidence:
            return False
        self.limiter.pause(wait)
        self.pauses.append((now, now + wait))
        while self.pauses and self.pauses[0][1] < now - MEASURE_SECONDS:
            self.pauses.popleft()
        new_episode = now - self.last_evidence > max(EPISODE_SECONDS, wait)
        self.last_evidence = now
        if limit_requests or limit_tokens:
            for which, limit in (("requests", limit_requests), ("tokens", limit_tokens)):
                current = self.limiter.gate.limit(which)
                if limit and new_episode and current is not None and current <= limit and scope in (None, which):
                    self._trim(which, current)  # refused at or under its stated limit: a shorter window holds less
                elif limit:
                    self._adopt(which, limit)
        elif new_episode:
            for which in BUDGETS:
                if scope in (None, which) and (which == "requests" or self.limiter.gate.tokens is not None):
                    self._cut(which)
        return True

    # --- decisions -------------------------------------------------------------------------------------

    def _clustered(self, now: float) -> bool:
        recent = [s for s in self.ring if s[0] > now - CLUSTER_SECONDS]
        refused = sum(s[3] for s in recent)
        answered = sum(s[1] for s in recent)
        return refused >= CLUSTER_COUNT and refused >= CLUSTER_SHARE * (refused + answered)

    def admitted_per_minute(self, which: str) -> float:
        """What the provider answered per second, per minute: the mean over the whole seconds of the last
        MEASURE_SECONDS in which answers came and the model was not paused (0: fewer than MIN_MEASURE_SECONDS
        of them). A paused second says nothing of the provider: an average over them once cut a 1,200 rpm
        provider's model to 553."""
        now = int(self.clock())
        column = 1 if which == "requests" else 2
        counts = [s[column] for s in self.ring if now - MEASURE_SECONDS <= s[0] < now and s[1] > 0
                  and not any(start < s[0] + 1 and s[0] < end for start, end in self.pauses)]
        if len(counts) < MIN_MEASURE_SECONDS:
            return 0.0
        return sum(counts) * 60.0 / len(counts)

    def _cut(self, which: str) -> None:
        """Down to what was admitted (the limit found); with nothing measured yet, halve."""
        admitted = self.admitted_per_minute(which) * ADMITTED_MARGIN
        current = self.limiter.gate.limit(which)
        if admitted > 0:
            self.found[which] = admitted
            new = admitted if current is None else min(current, admitted)
        elif current is None and any(self.limiter.gate.limit(b) is not None for b in BUDGETS if b != which):
            return  # nothing measured, no limit here, and another budget has one: that one is cut, none invented
        else:  # nothing measured yet: halve, and climb back to where it was once calm
            self.found[which] = current or 60.0
            new = self.found[which] / 2
        self.limiter.set_limit(which, max(1.0, new))

    def _trim(self, which: str, current: float) -> None:
        """A few percent below the rate that was refused: what a shorter window holds is a little less than the
        stated limit, and the stated limit is all that is known (what was admitted in the last seconds says
        less: a slow start or a pause lowers it)."""
        self.found[which] = current * ADMITTED_MARGIN
        self.limiter.set_limit(which, max(1.0, self.found[which]))

    def _adopt(self, which: str, limit: float) -> None:
        """A limit the provider stated is the ceiling, and the rate when ours is higher."""
        ceiling = self.ceiling[which]
        if ceiling is None or limit < ceiling:
            self.ceiling[which] = limit
            self.found.pop(which, None)  # measured under a higher limit: no longer what holds
        current = self.limiter.gate.limit(which)
        if current is None or current > limit:
            self.limiter.set_limit(which, limit)

    def _recover(self) -> None:
        """After a calm spell: back to the limit found quickly, beyond it slowly, never past the ceiling."""
        now = self.clock()
        if now - self.last_evidence < CALM_SECONDS or now - self.last_step < 1.0:
            return
        self.last_step = now
        for which in BUDGETS:
            current = self.limiter.gate.limit(which)
            if current is None:
                continue
            ceiling = self.ceiling[which]
            found = self.found.get(which)
            if found is not None and current < found:
                new = min(found, current + RECOVER_PER_SECOND * found)
            elif found is not None and (now - self.last_evidence) % PROBE_EVERY < 1.0:
                new = current + PROBE_STEP * found
            elif found is None and ceiling is not None and current < ceiling:
                new = current + RECOVER_PER_SECOND * ceiling
            else:
                continue
            if ceiling is not None:
                new = min(new, ceiling)
            if new > current:
                self.limiter.set_limit(which, new)

    def _slot(self) -> list[float]:
        second = int(self.clock())
        ring = self.ring
        if ring and ring[-1][0] == second:
            return ring[-1]
        ring.append([second, 0, 0, 0])
        while len(ring) > 61:
            ring.popleft()
        return ring[-1]
