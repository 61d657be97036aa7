"""The transition table, checked pair by pair against spec/API.md "States"."""

from __future__ import annotations

import itertools

import pytest

from bap_engine.states import TRANSITIONS, AuditAction, EngineState, can_transition

S = EngineState
# provisioning → running ⇄ sleeping; running/sleeping → stopped → running; running → failed → running;
# any → destroying. [decided] sleeping/stopped → failed: a wake or start whose engine does not come up.
EXPECTED = {
    (S.PROVISIONING, S.RUNNING), (S.RUNNING, S.SLEEPING), (S.SLEEPING, S.RUNNING),
    (S.RUNNING, S.STOPPED), (S.SLEEPING, S.STOPPED), (S.STOPPED, S.RUNNING),
    (S.RUNNING, S.FAILED), (S.SLEEPING, S.FAILED), (S.STOPPED, S.FAILED), (S.FAILED, S.RUNNING),
    *((s, S.DESTROYING) for s in S if s is not S.DESTROYING),
}


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(S, S)), ids=lambda s: str(s))
def test_every_pair(src: EngineState, dst: EngineState) -> None:
    assert can_transition(src, dst) is ((src, dst) in EXPECTED)


def test_table_is_complete_and_closed() -> None:
    assert set(TRANSITIONS) == set(S)
    for src, targets in TRANSITIONS.items():
        assert isinstance(targets, frozenset)
        assert src not in targets  # no self-loops: a no-op is not a transition
    assert TRANSITIONS[S.DESTROYING] == frozenset()  # terminal: the row is deleted


def test_states_and_actions_are_the_spec_names() -> None:
    assert [str(s) for s in S] == ["provisioning", "running", "sleeping", "stopped", "failed", "destroying"]
    assert {str(a) for a in AuditAction} == {
        "provision", "provision_failed", "start", "stop", "wake", "sleep", "destroy", "rotate_key", "health_check",
        "health_failed", "auto_restart_start", "auto_restart_success", "auto_restart_failed",
        "auto_restart_gave_up", "policy_register", "policy_update", "admit_denied", "reconcile",
        "pool_fill", "pool_claim", "settings_update", "product_delete", "platform_key_rotate", "upgrade"}
