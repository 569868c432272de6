"""Fair admission across clients and adapters: a virtual token counter (VTC; Sheng et al., "Fairness in Serving
Large Language Models", OSDI '24), two levels deep.

Every client (an API key's name; "" without keys) and every (client, adapter) flow counts the service it has
received in weighted tokens: its prompt tokens when a sequence joins the batch, and `OUTPUT_WEIGHT` per token as
they are decoded (an output token costs more than a prompt token, as in the paper). When the running batch has
room, the runner admits the next waiting sequence of the client with the smallest counter, and within that client
of the adapter with the smallest counter. A client or flow that becomes active again starts at the smallest counter
of those still active, so idle time banks no credit. Ties go to the one with fewer running sequences, then to the
oldest request; within a flow the order stays first come, first served.

Nothing is preempted: a newcomer takes the next row a running request frees. (Keeping a row of the batch free
for newcomers was tried: it cost about 20% of the throughput on the CPU, `bench.fairness_bench`, and did not
lower the light client's p99.)

What the runner keeps: admission stays load-aware (a flow whose adapter is loading, or has no free slot, is
passed over while the others are admitted) and the batch is filled as FCFS would fill it, so throughput is the
same; only the order changes.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import TYPE_CHECKING, Callable, Generic, Hashable, Iterable, TypeVar

if TYPE_CHECKING:  # the module stays free of torch: the CLI reads `ADMISSION` from it
    from hub.serving.sequence import Sequence

OUTPUT_WEIGHT = 2.0  # an output token's cost in prompt tokens (the paper's w_q / w_p)
MAX_IDLE_REMEMBERED = 4096  # idle members whose counters are kept (beyond: the lowest are forgotten)

K = TypeVar("K", bound=Hashable)


def client_of(sequence: Sequence) -> str:
    return sequence.params.client


def adapter_of(sequence: Sequence) -> str:
    return sequence.adapter.name if sequence.adapter is not None else ""


class VirtualCounters(Generic[K]):
    """One level of counters: the active members' and the idle ones' still remembered."""

    def __init__(self) -> None:
        self.values: dict[K, float] = {}
        self.active: set[K] = set()

    def activate(self, now_active: set[K]) -> None:
        """Members becoming active start at the smallest counter of those that stay active (never lower than
        their own); with nobody staying active every counter starts again from 0."""
        staying = self.active & now_active
        if not staying:
            self.values = {member: 0.0 for member in now_active}
        else:
            floor = min(self.values[member] for member in staying)
            for member in now_active - self.active:
                self.values[member] = max(self.values.get(member, 0.0), floor)
            self._forget_idle(now_active, floor)
        self.active = set(now_active)

    def _forget_idle(self, active: set[K], floor: float) -> None:
        """Idle members at or below the floor would be lifted to it anyway; beyond the cap the lowest go."""
        idle = sorted((value, member) for member, value in self.values.items()
                      if member not in active and value > floor)
        keep = {member for _, member in idle[-MAX_IDLE_REMEMBERED:]}
        self.values = {m: v for m, v in self.values.items() if m in active or m in keep}

    def charge(self, member: K, tokens: float) -> None:
        self.values[member] = self.values.get(member, 0.0) + tokens

    def get(self, member: K) -> float:
        return self.values.get(member, 0.0)


class FairAdmission:
    """The runner's admission order (`Scheduler._take_waiting`): VTC across clients, then across adapters."""

    def __init__(self, output_weight: float = OUTPUT_WEIGHT):
        self.output_weight = output_weight
        self.clients: VirtualCounters[str] = VirtualCounters()
        self.flows: dict[str, VirtualCounters[str]] = {}  # client -> its adapters' counters

    def charge_decoded(self, sequences: Iterable[Sequence]) -> None:
        """One decoded token for each sequence (after a step)."""
        for sequence in sequences:
            self._charge(sequence, self.output_weight)

    def _charge(self, sequence: Sequence, tokens: float) -> None:
        client = client_of(sequence)
        self.clients.charge(client, tokens)
        self.flows.setdefault(client, VirtualCounters()).charge(adapter_of(sequence), tokens)

    def _activate(self, sequences: list[Sequence]) -> None:
        by_client: dict[str, set[str]] = {}
        for sequence in sequences:
            by_client.setdefault(client_of(sequence), set()).add(adapter_of(sequence))
        self.clients.activate(set(by_client))
        for client in list(self.flows):
            if client not in by_client and client not in self.clients.values:
                del self.flows[client]  # forgotten at the client level: its flows go too
        for client, adapters in by_client.items():
            self.flows.setdefault(client, VirtualCounters()).activate(adapters)

    def admit(self, waiting: list[Sequence], running: list[Sequence], room: int,
              try_admit: Callable[[Sequence], bool]) -> list[Sequence]:
        """Up to `room` waiting sequences, in fair order, that `try_admit` let join. A flow whose head is not
        admitted (and not failed) waits this round: its adapter is loading or has no slot."""
        self._activate(waiting + running)
        queues = _queues(waiting)
        running_by = Counter(client_of(s) for s in running)
        running_by_flow = Counter((client_of(s), adapter_of(s)) for s in running)
        taken: list[Sequence] = []
        while queues and len(taken) < room:
            client = min(queues, key=lambda c: (self.clients.get(c), running_by[c], queues[c].oldest()))
            flows = queues[client]
            adapter = min(flows.heads, key=lambda a: (self.flows[client].get(a), running_by_flow[client, a],
                                                      flows.heads[a][0].id))
            sequence = flows.heads[adapter].popleft()
            if try_admit(sequence):
                taken.append(sequence)
                self._charge(sequence, len(sequence.prompt_ids))
                running_by[client] += 1
                running_by_flow[client, adapter] += 1
            elif not sequence.finished:
                flows.heads[adapter].clear()  # its later sequences wait for the same adapter
            flows.drop_empty(adapter)
            if not flows.heads:
                del queues[client]
        return taken


class _ClientQueue:
    """One client's waiting sequences by adapter, each in arrival order."""

    def __init__(self) -> None:
        self.heads: dict[str, deque[Sequence]] = {}

    def oldest(self) -> int:
        return min(queue[0].id for queue in self.heads.values())

    def drop_empty(self, adapter: str) -> None:
        if not self.heads.get(adapter, True):
            del self.heads[adapter]


def _queues(waiting: list[Sequence]) -> dict[str, _ClientQueue]:
    queues: dict[str, _ClientQueue] = {}
    for sequence in waiting:
        queue = queues.setdefault(client_of(sequence), _ClientQueue())
        queue.heads.setdefault(adapter_of(sequence), deque()).append(sequence)
    return queues


class FirstComeFirstServed:
    """The runner's admission before fairness: queue order, a sequence that cannot join yet passed over (the
    baseline of `bench.fairness_bench`)."""

    @staticmethod
    def charge_decoded(sequences: Iterable[Sequence]) -> None:
        return None

    @staticmethod
    def admit(waiting: list[Sequence], running: list[Sequence], room: int,
              try_admit: Callable[[Sequence], bool]) -> list[Sequence]:
        taken: list[Sequence] = []
        for sequence in waiting:
            if len(taken) >= room:
                break
            if try_admit(sequence):
                taken.append(sequence)
        return taken


ADMISSION = {"fair": FairAdmission, "fcfs": FirstComeFirstServed}  # `hub serve --admission`
