"""The MLflow UI in a real browser, against the `tracking_server` the pipeline logged to.

Headless Chromium (the system one, /usr/bin/chromium, driven by Playwright) opens the three views of the
README walkthrough: the experiment's runs table with the pipeline's nested runs, the analyze run's
artifacts with a CKA heatmap, and MLflow's compare-runs page for the per-language prune subnetworks; and the
experiment's Models view of the subnetworks' logged models with their perplexities.
It saves screenshots in pytest's tmp_path; with XLSUB_UPDATE_DOCS=1 the runs table, the comparison and the
Models view also go to docs/.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, stage_ids

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
LANGUAGES = ("en", "de", "zh")
DOCS = ROOT / "docs"
# UI preferences the MLflow 3 frontend keeps in localStorage, set before its scripts run: the "Model training"
# side of the GenAI / Model training switch, and the assistant side panel closed (it opens by itself on a
# first visit and covers a third of the page). If these keys change, only the screenshots look different.
UI_PREFERENCES = """try {
  localStorage.setItem('mlflow.workflowType_v1', '"machine_learning"');
  localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
  localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
} catch (e) {}"""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install -y chromium)"),
]


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 940})
        context.add_init_script(UI_PREFERENCES)
        context.set_default_timeout(30_000)
        page = context.new_page()
        yield page
        context.close()
        browser.close()


def open_page(page, url: str):
    page.goto(url, wait_until="load")  # not networkidle: the UI keeps polling the server
    close = page.get_by_role("button", name="Close")  # the assistant panel, should the preference not hold
    if close.count() == 1 and close.is_visible():
        close.click()


def run_link(page, run_id: str):
    return page.locator(f'a[href$="/runs/{run_id}"]')


def settle(page):
    """No hover or focus ring in the screenshot."""
    page.mouse.move(1, 1)
    page.evaluate("document.activeElement && document.activeElement.blur()")
    page.wait_for_timeout(500)


def test_mlflow_ui_shows_the_pipeline_its_heatmaps_and_the_subnetwork_comparison(tracking_server, pipeline, page, tmp_path):
    client = MlflowClient(tracking_server)
    main = pipeline["first"]
    exp = main.info.experiment_id
    stages = stage_ids(main)
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{stages['prune']}'")
    child_ids = {r.data.tags["xlsub.language"]: r.info.run_id for r in children}
    assert sorted(child_ids) == sorted(LANGUAGES)

    # 1. The runs table: main, its four stage runs, and the prune run's per-language child runs.
    open_page(page, f"{tracking_server}/#/experiments/{exp}/runs")
    expand = 'button[data-component-id*="runnamecellrenderer"]'  # the +/- in the Run Name cell of a parent run
    run_link(page, main.info.run_id).wait_for()
    page.get_by_role("row").filter(has=run_link(page, main.info.run_id)).locator(expand).click()
    run_link(page, stages["prune"]).wait_for()
    page.get_by_role("row").filter(has=run_link(page, stages["prune"])).locator(expand).click()
    expected = {main.info.run_id: "main", **{run_id: stage for stage, run_id in stages.items()},
                **{run_id: f"prune/{lang}-s0" for lang, run_id in child_ids.items()}}
    for run_id, name in expected.items():
        link = run_link(page, run_id)
        link.wait_for()
        assert link.inner_text().strip() == name
    settle(page)
    page.screenshot(path=tmp_path / "ui-runs.png")
    DOCS.mkdir(exist_ok=True)
    if os.environ.get("XLSUB_UPDATE_DOCS"):
        shutil.copyfile(tmp_path / "ui-runs.png", DOCS / "ui-runs.png")

    # 2. The analyze run's artifacts: expand figures/ and preview a CKA heatmap.
    open_page(page, f"{tracking_server}/#/experiments/{exp}/runs/{stages['analyze']}/artifacts")
    node = lambda name: page.locator(f'[data-testid="artifact-tree-node"][artifact-name="{name}"]')
    node("figures").click()
    for figure in ("cka_pairs.png", "cka_vs_reference.png"):
        node(figure).wait_for()
    node("cka_pairs.png").click()
    image = page.locator('img[alt="figures/cka_pairs.png"]')
    image.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    settle(page)
    page.screenshot(path=tmp_path / "ui-artifacts.png")

    # 3. The three language subnetworks side by side on MLflow's compare-runs page.
    ids = [child_ids[lang] for lang in LANGUAGES]
    open_page(page, f"{tracking_server}/#/compare-runs?runs={json.dumps(ids, separators=(',', ':'))}&experiments=[\"{exp}\"]")
    page.get_by_text("Comparing 3 Runs").wait_for()
    names_row = page.get_by_role("row").filter(has_text="Run Name:")
    names_row.wait_for()
    assert [c.strip() for c in names_row.get_by_role("cell").all_inner_texts()] == [f"prune/{lang}-s0" for lang in LANGUAGES]
    for section in ("Visualizations", "Parameters", "Artifacts", "Tags"):  # keep run details and metrics on screen
        page.get_by_role("button", name=section, exact=True).click()
    names, values = page.get_by_role("grid").first, page.get_by_role("grid").last  # the metrics table: names | values
    for lang in LANGUAGES:
        names.get_by_text(f"ppl.{lang}", exact=True).wait_for()
    # The table shows about 6 of its rows; scroll its values so that the ppl.<lang> rows are in view. The
    # names column follows the values one scroll event late, so the last event is a 1-pixel step.
    offset = names.evaluate("""(grid, metric) => {
        const row = [...grid.querySelectorAll('a')].find(a => a.textContent.trim() === metric).parentElement;
        const height = row.offsetHeight;
        return Math.max(0, Math.ceil((row.offsetTop + height - grid.clientHeight) / height) * height);
    }""", f"ppl.{LANGUAGES[-1]}")
    if offset:
        values.hover()
        page.mouse.wheel(0, offset - 1)
        page.wait_for_timeout(300)
        page.mouse.wheel(0, 1)
        page.wait_for_timeout(300)
        tops = [names.evaluate("g => g.scrollTop"), values.evaluate("g => g.scrollTop")]
        assert abs(tops[0] - tops[1]) <= 1, tops
    page.get_by_text("Comparing 3 Runs").evaluate("title => title.scrollIntoView({block: 'center'})")  # back to the top
    box = names.bounding_box()
    for lang in LANGUAGES:
        label = names.get_by_text(f"ppl.{lang}", exact=True).bounding_box()
        assert box["y"] <= label["y"] and label["y"] + label["height"] <= box["y"] + box["height"], f"ppl.{lang} not in view"
    settle(page)
    page.screenshot(path=tmp_path / "ui-compare-subnetworks.png")
    if os.environ.get("XLSUB_UPDATE_DOCS"):  # the README's pictures change only on request
        shutil.copyfile(tmp_path / "ui-compare-subnetworks.png", DOCS / "ui-compare-subnetworks.png")


def test_mlflow_ui_models_view_lists_the_subnetworks_with_their_perplexities(tracking_server, pipeline, page, tmp_path):
    """The experiment's Models view (MLflow 3's logged models, `#/experiments/<id>/models`): the subnetworks
    of the third pipeline run (threshold 1.3, registered) by name, with their ppl.<lang> columns on screen
    showing the models' own metrics."""
    client = MlflowClient(tracking_server)
    exp = pipeline["third"].info.experiment_id
    prune_id = stage_ids(pipeline["third"])["prune"]
    models = [m for child in client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{prune_id}'")
              for m in client.search_logged_models(experiment_ids=[exp], filter_string=f"source_run_id = '{child.info.run_id}'")]
    assert sorted(m.name for m in models) == [f"subnetwork-{lang}-s0" for lang in sorted(LANGUAGES)]

    open_page(page, f"{tracking_server}/#/experiments/{exp}/models")
    for m in models:
        page.locator(f'.ag-pinned-left-cols-container [row-id="{m.model_id}"]').get_by_text(m.name, exact=True).wait_for()
    # Columns: leave the model name, creation time, source run and registered versions, and of the metrics
    # only ppl.<lang>; the table shows every metric in a column of its own, wider together than the page,
    # and renders only the columns in view.
    page.get_by_role("button", name="Columns").click()
    node = lambda title: page.locator('[class*="-tree-treenode"]').filter(has=page.locator(f'[class*="-tree-title"]:text-is("{title}")'))
    for title in ("Status", "Logged from", "Dataset", "Metrics"):  # every metric off (the finetuned model's too), then ppl.<lang>
        node(title).locator('[class*="-tree-checkbox"]').first.click()
    node("No dataset").locator('[class*="-tree-switcher"]').first.click()
    for lang in LANGUAGES:
        node(f"ppl.{lang}").locator('[class*="-tree-checkbox"]').first.click()
    page.keyboard.press("Escape")
    page.set_viewport_size({"width": 1700, "height": 940})  # columns are 200 px: seven of them, beside the side bar
    width, columns = page.viewport_size["width"], {}
    for lang in LANGUAGES:
        header = page.get_by_role("columnheader", name=f"ppl.{lang}", exact=True)
        header.wait_for()
        box = header.bounding_box()
        assert 0 <= box["x"] and box["x"] + box["width"] <= width, f"ppl.{lang} not in view"
        columns[lang] = header.get_attribute("col-id")
    for m in models:
        metrics = {metric.key: metric.value for metric in m.metrics}
        cells = page.locator(f'.ag-center-cols-container [row-id="{m.model_id}"] [col-id]')
        ids = [c.replace("&quot;", '"') for c in cells.evaluate_all("cs => cs.map(c => c.getAttribute('col-id'))")]  # cells escape it, headers not
        for lang in LANGUAGES:
            cell = cells.nth(ids.index(columns[lang]))
            assert cell.is_visible(), (m.name, lang)
            assert math.isclose(float(cell.inner_text()), metrics[f"ppl.{lang}"], rel_tol=1e-9), (m.name, lang, cell.inner_text())
    settle(page)
    page.screenshot(path=tmp_path / "ui-models.png")
    if os.environ.get("XLSUB_UPDATE_DOCS"):
        shutil.copyfile(tmp_path / "ui-models.png", DOCS / "ui-models.png")
