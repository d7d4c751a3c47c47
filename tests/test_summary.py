"""What `make demo` prints last: the commands that work from a fresh shell (venv activated, conda not
needed) and the link to the runs table rather than the experiment's GenAI overview."""

from entry_points.summary import demo_page, next_steps, stage_line
from xlsub.artifacts import input_tag


def test_next_steps_activate_the_venv_open_the_runs_table_and_rerun_a_stage_locally():
    tags = {input_tag("finetune"): "f1", input_tag("encode"): "e1"}
    lines = next_steps("sqlite:////tmp/mlflow.db", "7", tags, "xlsub-demo")
    text = "\n".join(lines)
    assert "source .venv/bin/activate" in text
    assert "mlflow ui --backend-store-uri sqlite:////tmp/mlflow.db --host 127.0.0.1" in text
    assert "http://127.0.0.1:5000/#/experiments/7/runs" in text
    prune = next(l for l in lines if "-e prune" in l)
    assert "--env-manager local" in prune and "finetune_run_id=f1" in prune
    assert any("-e analyze" in l and "encode_run_id=e1" in l for l in lines)
    # issue 24, case 1: every command runs into the experiment the link shows, not `Default`
    assert all("--experiment-name xlsub-demo" in l for l in lines if "mlflow run ." in l)
    assert "--experiment-name 'my study'" in "\n".join(next_steps("http://tracking.example:5000/", "3", {input_tag("encode"): "e"}, "my study"))
    server = "\n".join(next_steps("http://tracking.example:5000/", "3", {}, "my study"))
    assert "mlflow ui" not in server and "http://tracking.example:5000/#/experiments/3/runs" in server


def test_each_stage_line_shows_its_time_and_whether_it_was_reused():
    assert stage_line("prune", "p1", 123.4, False) == "  prune     p1     123 s"
    assert stage_line("encode", "e1", 9.6, True).endswith("  10 s (reused: computed by an earlier pipeline)")
    assert stage_line("analyze", "a1", None, False).endswith("still running")


def test_the_demo_page_is_made_of_the_verdicts_and_stamped_with_the_commit():
    answers = [{"key": "specificity", "question": "Q?", "answer": "yes for 6 of 8 languages", "value": 0.318, "lo": 0.075, "hi": 0.643,
                "control": "random masks", "control_value": 0.274, "p": 1 / 256, "unit": "languages > seeds > chunks", "n_units": 8,
                "test": "sign_flip_exact", "p_floor": 1 / 256, "robust_to_leave_one_out": False}]
    page = demo_page("xlsub-demo", "0123456789abcdef", {"finetune": 216.0, "prune": 60.0}, ["prune"], answers, {"bootstrap": "1000", "lr": "1"})
    assert "commit `0123456789ab`" in page and "### Q?" in page and "yes for 6 of 8 languages." in page
    assert "| 0.318 | [0.075, 0.643] | random masks: 0.274 | 0.00391 | 0.00391 | sign_flip_exact | languages > seeds > chunks | 8 | no |" in page
    assert "| finetune | 3.6 |  |" in page and "| prune | 1.0 | reused |" in page and "4.6 minutes for the 2 stages (prune computed by an earlier pipeline" in page
    assert "`bootstrap=1000`" in page and "lr" not in page.split("settings")[-1]
