"""A person's approval before ``champion`` moves (``promotion.require_approval: true``).

The flow pauses with Prefect's ``pause_flow_run(wait_for_input=ApprovalInput)``: the run shows as
*Paused* in the Prefect UI with the evidence as its description and a form for the answer, and
``nerveseg approve RUN_ID --reason ...`` / ``nerveseg reject RUN_ID --reason ...`` answer it through
the API (:func:`answer`). No answer within ``promotion.approval_timeout_s`` means no promotion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from uuid import UUID

from prefect.input import RunInput

from pipeline.promotion import PromotionDecision


class ApprovalInput(RunInput):
    """The answer to a held promotion. ``nerveseg approve`` fills in ``identity`` (who answers, see
    ``pipeline.identity``); an answer typed into the Prefect UI's form has none, and is recorded as such."""

    decision: Literal["approve", "reject"]
    reason: str
    actor: str = ""            # on whose behalf (free text), never the identity
    identity: str = ""
    identity_source: str = ""


@dataclass(frozen=True)
class Answer:
    decision: str          # approve, reject or timeout
    reason: str
    actor: str             # who answered (an identity), "timeout", or "prefect-ui"
    on_behalf_of: str = ""
    identity_source: str = ""

    def approver(self):
        from pipeline.identity import Identity

        return Identity(self.actor, self.identity_source or "unknown")


class ApprovalTimeout(RuntimeError):
    """Nobody answered a held promotion in time; the version was not promoted (and that is recorded)."""


class ApprovalError(RuntimeError):
    """An answer could not be delivered (no such run, not paused, no server)."""


def evidence_markdown(name: str, version: str, decision: PromotionDecision, flow_run_id: str,
                      timeout_s: int) -> str:
    """What the approver sees: the gate's decision on the same frames, and how to answer."""
    return (
        f"## Approval needed: {name} version {version} → `champion`\n\n"
        f"The version passed the automatic gate; `promotion.require_approval` is on, so the alias moves only "
        f"when a person approves.\n\n{decision.to_markdown()}\n"
        f"Answer within {timeout_s} s (no answer: not promoted, recorded in the ledger):\n\n"
        f"```\nnerveseg approve {flow_run_id} --reason \"...\" [--actor ON_BEHALF_OF]\n"
        f"nerveseg reject {flow_run_id} --reason \"...\"\n```\n\n"
        f"or fill in the form of this paused run in the Prefect UI (decision `approve` or `reject`, a reason, "
        f"your name).\n"
    )


def wait_for_approval(description: str, timeout_s: int) -> Answer:
    """Pause the current flow run until approved, rejected or timed out (call it in the flow body)."""
    from prefect import pause_flow_run
    from prefect.exceptions import FlowPauseTimeout

    poll = max(1, min(5, timeout_s // 20))
    try:
        answer = pause_flow_run(wait_for_input=ApprovalInput.with_initial_data(description=description),
                                timeout=timeout_s, poll_interval=poll, key="approval")
    except FlowPauseTimeout:
        return Answer("timeout", f"no answer within {timeout_s} s", "timeout")
    if answer.identity:
        return Answer(answer.decision, answer.reason, answer.identity, answer.actor, answer.identity_source)
    # the UI's form: the Prefect server's login is shared, so nobody in particular is known
    return Answer(answer.decision, answer.reason, "prefect-ui", answer.actor, "prefect-ui")


def answer(flow_run_id: str, decision: Literal["approve", "reject"], reason: str, on_behalf_of: str | None = None,
           tracking_uri: str | None = None) -> str:
    """Resume a paused retraining run with an answer, with who gives it; returns the flow run's name."""
    from pipeline.identity import acting_identity

    from prefect import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.flow_runs import resume_flow_run
    from prefect.settings import PREFECT_API_URL

    if not reason.strip():
        raise ApprovalError("an approval answer needs a reason (--reason)")
    try:
        run_id = UUID(flow_run_id)
    except ValueError:
        raise ApprovalError(f"{flow_run_id!r} is not a flow run id (a UUID, as printed by the paused run)") from None
    where = PREFECT_API_URL.value() or "the local ephemeral Prefect server"
    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(run_id)
    except ObjectNotFound:
        raise ApprovalError(f"no flow run {flow_run_id} on {where}; is PREFECT_API_URL set to the server "
                            f"that runs the flow (`nerveseg services up`)?") from None
    except Exception as exc:  # the server is down or unreachable
        raise ApprovalError(f"cannot reach the Prefect server at {where}: {exc}") from exc
    if run.state is None or not run.state.is_paused():
        state = run.state.name if run.state else "no state"
        raise ApprovalError(f"flow run {run.name} ({flow_run_id}) is not waiting for approval (state: {state})")
    try:
        who = acting_identity(tracking_uri or "")
        resume_flow_run(run_id, run_input={"decision": decision, "reason": reason, "actor": on_behalf_of or "",
                                           "identity": who.name, "identity_source": who.source})
    except Exception as exc:  # timed out meanwhile, or the input was refused
        raise ApprovalError(f"flow run {run.name} ({flow_run_id}) could not be resumed: {exc}") from exc
    return run.name
