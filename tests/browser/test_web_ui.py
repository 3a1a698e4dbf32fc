"""The operator's path through the Temporal Web UI, in a real (headless) browser.

Each step is what an operator clicks; the screenshots are the README's operator guide.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
from playwright.async_api import Locator, Page, expect
from temporalio.client import Client

from tests.helpers import (
    assert_eventually,
    audit_rows,
    new_domain,
    replies_for,
    seed_command,
    status_of,
)
from tsq.client import TroubleshootingClient
from tsq.contract import TsqState
from tsq.workflows.troubleshooting import TroubleshootingWorkflow


def awaiting_query(domain: str) -> str:
    return f'CommandDomain="{domain}" AND TsqState="AWAITING_OPERATOR"'


async def wait_listed(temporal: Client, query: str) -> None:
    """The list page shows what visibility has indexed: wait for it, not for the page."""

    async def count() -> int:
        return (await temporal.count_workflows(query)).count

    await assert_eventually(count, lambda n: n == 1)


async def filter_workflows(page: Page, ui_url: str, query: str) -> None:
    """Workflows -> `</>` (raw query) -> type the query -> Enter."""
    await page.goto(f"{ui_url}/namespaces/default/workflows")
    await page.get_by_test_id("toggle-manual-query").click()
    box = page.get_by_role("searchbox", name="Enter a query")
    await box.fill(query)
    await box.press("Enter")


async def show_tsq_columns(page: Page) -> None:
    """Configure Columns -> add tsq's search attributes, drop the columns that say nothing here."""
    await page.get_by_role("button", name="Configure Columns").click()
    for name in ("CommandType", "LastErrorCode", "TsqState", "TsqClaimedBy"):
        await page.get_by_role("button", name=f"Add {name} column").click()
    for name in ("Run ID", "Type", "End"):
        await page.get_by_role("button", name=f"Remove {name} column").click()
    await page.get_by_role("button", name="Close Workflows Table configuration").click()
    await expect(page.get_by_role("heading", name="Configure Workflows Table")).to_be_hidden()


async def open_current_details(page: Page) -> Locator:
    """Tab "User Metadata": the workflow's current details, rendered from Markdown in a frame."""
    await page.get_by_role("tab", name="User Metadata").click()
    heading = page.get_by_role("heading", name="Current Details")
    return heading.locator("xpath=following::iframe[1]").content_frame.locator("body")


async def fill_dialog(page: Page, action: str, handler: str, payload: dict[str, Any]) -> Locator:
    """More Actions -> `action` -> pick `handler` -> paste `payload` as JSON; returns the dialog."""
    await page.get_by_role("button", name="More Actions").click()
    await page.get_by_role("menuitem", name=action).click()
    dialog = page.get_by_role("dialog", name=action)
    await dialog.get_by_role("button", name=re.compile(r"^Select an? ")).click()
    await dialog.get_by_role("option", name=re.compile(rf"^{re.escape(handler)}\b")).click()
    data = dialog.get_by_role("textbox", name="Data")
    await data.fill(json.dumps(payload))
    # The editor reformats its JSON when it loses focus, which moves the Submit button: a click
    # on Submit that also takes the focus away is lost. So leave the editor first.
    await data.evaluate("editor => editor.blur()")

    async def editor_json() -> Any:
        try:
            return json.loads(await data.inner_text())
        except json.JSONDecodeError:
            return None

    await assert_eventually(editor_json, lambda value: value == payload)
    return dialog


async def test_operator_cancels_with_signal_from_web_ui(
    page: Page,
    ui_url: str,
    tsq: TroubleshootingClient,
    pool: asyncpg.Pool,
    screenshots: Path,
) -> None:
    """Filter, open the workflow, signal `cancel`: CANCELED, one reply, one OPERATOR_CANCEL row."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    workflow_id = await tsq.start_workflow(domain, command_id)
    await wait_listed(tsq.temporal, awaiting_query(domain))

    await filter_workflows(page, ui_url, awaiting_query(domain))
    await show_tsq_columns(page)
    row = page.get_by_role("row").filter(has=page.get_by_role("link", name=workflow_id))
    await expect(row).to_contain_text("AWAITING_OPERATOR")
    await expect(row).to_contain_text("ACCOUNT_CLOSED")
    # Save as New: the query, with these columns, is one click away from now on.
    view = f"{domain} awaiting a decision"  # letters, digits, spaces, - _ . only
    await page.get_by_role("button", name="Save as New").click()
    saving = page.get_by_role("dialog", name="Save as New View")
    await saving.get_by_role("textbox").fill(view)
    await saving.get_by_role("button", name="Save").click()
    await expect(page.get_by_text(view).first).to_be_visible()
    await page.screenshot(path=screenshots / "ui-1-filter.png")

    await row.get_by_role("link", name=workflow_id).click()
    details = await open_current_details(page)
    await expect(details).to_contain_text(str(command_id))
    await expect(details).to_contain_text("AWAITING_OPERATOR")
    await page.screenshot(path=screenshots / "ui-2-details.png")

    decision = {"reason": "Account closed by the customer", "operator": "jane@example.com"}
    dialog = await fill_dialog(page, "Send a Signal", "cancel", decision)
    await page.screenshot(path=screenshots / "ui-3-signal.png")
    await dialog.get_by_role("button", name="Submit").click()
    await expect(dialog).to_be_hidden()

    await assert_eventually(
        lambda: status_of(pool, domain, command_id), lambda s: s == "CANCELED", within=30
    )
    await expect(page.get_by_role("main").get_by_role("status").first).to_have_text(
        re.compile("completed", re.IGNORECASE)
    )
    # The workflow has ended: nothing more can be written, so these counts are final.
    [reply] = await replies_for(pool, f"{domain}__replies", command_id)
    assert reply["outcome"] == "CANCELED"
    [audit] = await audit_rows(pool, domain, command_id, "OPERATOR_CANCEL")
    assert audit["details_json"]["operator"] == "jane@example.com"
    assert audit["details_json"]["reason"] == decision["reason"]

    # The status badge follows the workflow by itself; the current details are read once per
    # page load, so reload as an operator would.
    await page.reload()
    details = await open_current_details(page)
    await expect(details).to_contain_text("CANCELED")
    await expect(details).to_contain_text("jane@example.com")
    await page.screenshot(path=screenshots / "ui-4-canceled.png")


async def test_update_with_blank_reason_is_refused_in_web_ui(
    page: Page,
    ui_url: str,
    tsq: TroubleshootingClient,
    pool: asyncpg.Pool,
    screenshots: Path,
) -> None:
    """Send an Update `operator_cancel` with a blank reason: the UI shows why; nothing changes."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    workflow_id = await tsq.start_workflow(domain, command_id)

    await page.goto(f"{ui_url}/namespaces/default/workflows/{quote(workflow_id, safe='')}")
    dialog = await fill_dialog(
        page, "Send an Update", "operator_cancel", {"reason": "  ", "operator": "jane@example.com"}
    )
    await dialog.get_by_role("button", name="Submit").click()
    await expect(dialog.get_by_text("reason: must not be blank")).to_be_visible()
    await page.screenshot(path=screenshots / "ui-5-update-refused.png")

    assert await status_of(pool, domain, command_id) == "IN_TROUBLESHOOTING_QUEUE"
    assert await audit_rows(pool, domain, command_id) == []
    assert await replies_for(pool, f"{domain}__replies", command_id) == []
    effects = await pool.fetchval(
        "SELECT count(*) FROM tsq.effect WHERE domain = $1 AND command_id = $2",
        domain,
        command_id,
    )
    assert effects == 0
    handle = tsq.temporal.get_workflow_handle(workflow_id)
    state = await handle.query(TroubleshootingWorkflow.state)
    assert state.state is TsqState.AWAITING_OPERATOR
    assert state.decision is None


async def test_second_operator_approves_a_proposal_from_web_ui(
    page: Page,
    ui_url: str,
    tsq: TroubleshootingClient,
    pool: asyncpg.Pool,
    screenshots: Path,
) -> None:
    """Under a four-eyes policy a complete waits as PENDING_APPROVAL; the details say who
    proposed what and give the JSON; Send an Update `operator_approve` as another operator
    carries it out."""
    domain = new_domain()
    await tsq.set_policy(domain, "four-eyes", require_approval=["complete"], operator="lead")
    command_id = await seed_command(pool, domain)
    workflow_id = await tsq.start_workflow(domain, command_id)
    proposed = await tsq.operator_complete(
        domain, command_id, result_data={"refunded": True}, operator="alice@example.com"
    )
    assert proposed is not None and proposed.proposal is not None
    await wait_listed(tsq.temporal, f'CommandDomain="{domain}" AND TsqState="PENDING_APPROVAL"')

    await page.goto(f"{ui_url}/namespaces/default/workflows/{quote(workflow_id, safe='')}")
    details = await open_current_details(page)
    await expect(details).to_contain_text("PENDING_APPROVAL")
    await expect(details).to_contain_text("proposed by alice@example.com")
    await page.screenshot(path=screenshots / "ui-6-proposal.png")

    approval = {"operator": "bob@example.com", "comment": "refund confirmed by the bank"}
    dialog = await fill_dialog(page, "Send an Update", "operator_approve", approval)
    await page.screenshot(path=screenshots / "ui-7-approve.png")
    await dialog.get_by_role("button", name="Submit").click()
    await expect(dialog).to_be_hidden()

    await assert_eventually(
        lambda: status_of(pool, domain, command_id), lambda s: s == "COMPLETED", within=30
    )
    [reply] = await replies_for(pool, f"{domain}__replies", command_id)
    assert reply["data"] == {"refunded": True}
    [approved] = await audit_rows(pool, domain, command_id, "TSQ_APPROVED")
    assert approved["details_json"]["operator"] == "bob@example.com"
    [complete] = await audit_rows(pool, domain, command_id, "OPERATOR_COMPLETE")
    assert complete["details_json"]["approved_by"] == "bob@example.com"


async def test_what_holds_a_command_shows_first_and_fits_the_panel(
    page: Page,
    ui_url: str,
    tsq: TroubleshootingClient,
    pool: asyncpg.Pool,
    screenshots: Path,
) -> None:
    """Claimed, with a note and a proposal waiting, under a policy with deadlines: opened
    straight on its User Metadata tab, the current details say who holds it, what awaits
    approval and when things are due before anything else, each under its own heading, and
    every JSON block fits the panel without scrolling sideways."""
    domain = new_domain()
    await tsq.set_policy(
        domain, "four-eyes", require_approval=["complete"], escalate_after="1h",
        expire_after="7d", expire_decision="cancel", reason="too old", operator="lead",
    )  # fmt: skip
    command_id = await seed_command(pool, domain)
    workflow_id = await tsq.start_workflow(domain, command_id)
    await tsq.claim(domain, command_id, operator="jane@example.com", for_="2h")
    await tsq.note(domain, command_id, "asked the ledger team", operator="jane@example.com")
    await tsq.operator_complete(
        domain, command_id, result_data={"refunded": True}, operator="jane@example.com"
    )
    run_id = (await tsq.temporal.get_workflow_handle(workflow_id).describe()).run_id

    await page.goto(
        f"{ui_url}/namespaces/default/workflows/{quote(workflow_id, safe='')}/{run_id}"
        "/user-metadata"
    )
    details = (
        page.get_by_role("heading", name="Current Details")
        .locator("xpath=following::iframe[1]")
        .content_frame.locator("body")
    )
    await expect(details).to_contain_text("PENDING_APPROVAL")
    text = await details.inner_text()
    order = [text.find(s) for s in ("Claimed by jane", "Awaiting approval", "Time", "Notes")]
    assert -1 not in order and order == sorted(order), text
    await expect(details.get_by_role("heading", name="Notes")).to_be_visible()
    overflow = await details.locator("pre").evaluate_all(
        "blocks => blocks.map(b => b.scrollWidth - b.clientWidth)"
    )
    assert overflow and max(overflow) <= 0, overflow
    await page.screenshot(path=screenshots / "ui-8-held.png")
