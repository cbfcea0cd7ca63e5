"""lmms-eval evaluates an xllm adapter through the plugin (entry point `lmms_eval.models`, no edit of lmms-eval):
its CLI, offline, on the `xllm_shapes_mme` task, gives the MME acc / acc+ / score that `evaluate.py` gives on the
same records, and on `xllm_shapes_open` the VQAv2 exact match that `evaluate.py --metric open` gives.

lmms-eval 0.7.3's own pins would downgrade av and wandb in the pinned set, so `make test` installs it with
--no-deps into `.cache/lmms-eval-site` (requirements-lmms-eval.txt) and names that folder in
XLLM_LMMS_EVAL_SITE; without it this test is skipped and says so.

The README's install and command, as a new user runs them, get a venv built from the `lmms-eval` extra alone:
`make test`'s `.cache/lmms-eval-venv` (named in XLLM_LMMS_EVAL_VENV; the Makefile says how it is built)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_model
from xllm.evaluation.run import evaluate
from xllm.model import XLLM

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 16  # the first two images' yes/no pairs in their four categories (an even count keeps pairs whole)


def lmms_site() -> str:
    site = os.environ.get("XLLM_LMMS_EVAL_SITE", "")
    if not site or not (Path(site) / "lmms_eval").is_dir():
        pytest.skip("lmms-eval is not installed beside the venv: `make test` installs it into .cache/lmms-eval-site")
    return str(Path(site).resolve())


@pytest.mark.slow
def test_lmms_eval_scores_an_adapter_as_evaluate_py_does(tiny, tmp_path):
    site = lmms_site()
    adapter = make_model(tiny).eval().save_pretrained(tmp_path / "adapter", stage=2)
    work = tmp_path / "repo"  # lmms-eval runs where `make demo` would have written the data
    shutil.copytree(tiny / "data" / "images", work / ".cache" / "demo" / "data" / "images")
    records = (tiny / "data" / "test_yesno.jsonl").read_text().splitlines()[:LIMIT]
    (work / ".cache" / "demo" / "data" / "test_yesno.jsonl").write_text("\n".join(records) + "\n")
    open_records = (tiny / "data" / "test_open.jsonl").read_text().splitlines()[:LIMIT]
    (work / ".cache" / "demo" / "data" / "test_open.jsonl").write_text("\n".join(open_records) + "\n")

    env = {**os.environ, "PYTHONPATH": site, "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets")}
    run = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "eval", "--model", "xllm", "--model_args", f"adapter={adapter}",
         "--tasks", "xllm_shapes_mme,xllm_shapes_open", "--include_path", str(ROOT / "xllm/evaluation/lmms_tasks"),
         "--batch_size", "8", "--limit", str(LIMIT), "--output_path", str(tmp_path / "lmms_out"), "--log_samples"],
        cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-5000:])
    (results_file,) = [p for p in (tmp_path / "lmms_out").rglob("*results.json")]  # lmms-eval exits 0 on errors
    results = json.loads(results_file.read_text())["results"]
    got = results["xllm_shapes_mme"]
    (samples_file,) = [p for p in (tmp_path / "lmms_out").rglob("*samples_xllm_shapes_mme.jsonl")]
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]

    # Its replies are xllm's own (greedy, the task's 16 tokens), question by question.
    model = XLLM.from_pretrained(adapter)
    rows = [json.loads(line) for line in records]
    expected = model.reply([r["conversations"][:1] for r in rows],
                           [{"image": str(work / ".cache/demo/data" / r["image"])} for r in rows], max_new_tokens=16)
    assert [s["filtered_resps"] for s in sorted(samples, key=lambda s: s["doc_id"])] == expected

    table = evaluate(adapter=str(adapter), data=str(work / ".cache/demo/data/test_yesno.jsonl"),
                     output=str(tmp_path / "eval.json"), metric="yes_no")["metrics"]
    assert got["mme_acc,none"] == pytest.approx(table["all"]["acc"])
    assert got["mme_acc_plus,none"] == pytest.approx(table["all"]["acc_plus"])
    # MME's score is the sum over categories of acc x 100 + acc+ x 100
    assert got["mme_score,none"] == pytest.approx(sum(v["score"] for k, v in table.items() if k != "all"))

    # The open questions: lmms-eval's own VQAv2 normalisation and exact match, evaluate.py's number.
    opened = evaluate(adapter=str(adapter), data=str(work / ".cache/demo/data/test_open.jsonl"),
                      output=str(tmp_path / "open.json"), max_new_tokens=24)
    assert opened["metric"] == "open" and opened["metrics"]["all"]["questions"] == LIMIT
    (open_file,) = [p for p in (tmp_path / "lmms_out").rglob("*samples_xllm_shapes_open.jsonl")]
    open_samples = sorted((json.loads(line) for line in open_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert [s["filtered_resps"] for s in open_samples] == [s["reply"] for s in opened["samples"]]
    assert results["xllm_shapes_open"]["exact_match,none"] == pytest.approx(opened["metrics"]["all"]["exact_match"])


def test_the_task_scores_replies_as_xllm_scores_them(tmp_path):
    """The task's aggregation (run where lmms-eval is importable) against `mme_table` on the same mixed replies."""
    site = lmms_site()
    from xllm.evaluation.mme import mme_table

    replies = ["Yes", "No", "yes, it is", "Nope", "No.", "no", "maybe", "Yes"]
    rows = [{"id": str(i), "category": ["count", "colour"][i // 4], "image_id": f"img{i // 2}",
             "reference": ["Yes", "No"][i % 2], "prediction": reply} for i, reply in enumerate(replies)]
    table = mme_table(rows)
    script = f"""
import json, sys
sys.path.insert(0, {str(ROOT / "xllm/evaluation/lmms_tasks/xllm_shapes_mme")!r})
import utils
rows = json.loads({json.dumps(json.dumps(rows))})
scored = [utils.process_results({{"conversations": [{{"value": "?"}}, {{"value": r["reference"]}}],
                                  "image_id": r["image_id"], "category": r["category"]}}, [r["prediction"]])["mme_acc"]
          for r in rows]
print(json.dumps([utils.aggregate_acc(scored), utils.aggregate_acc_plus(scored), utils.aggregate_score(scored)]))
"""
    run = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": site}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    acc, acc_plus, score = json.loads(run.stdout.strip().splitlines()[-1])
    assert (acc, acc_plus) == (pytest.approx(table["all"]["acc"]), pytest.approx(table["all"]["acc_plus"]))
    assert score == pytest.approx(table["count"]["score"] + table["colour"]["score"])
    assert 0 < acc < 1 and 0 < acc_plus < 1


def readme_lmms_eval_block() -> str:
    """The code block of the README's lmms-eval section: the install line and the command."""
    section = (ROOT / "README.md").read_text().split("## Evaluate with lmms-eval", 1)[1]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_the_readme_command_works_as_written_in_a_venv_of_the_extra(tiny, tmp_path):
    """The README's lmms-eval command, word for word (plus a --limit), run by the `lmms-eval` that the README's
    `pip install '.[lmms-eval]'` put in a venv of its own, where the README has the adapter and the data: it must
    write its results, as it does not fail by its exit code (a fresh install once resolved filelock 4, which
    lmms-eval 0.7.3 cannot use, and still exited 0)."""
    venv = Path(os.environ.get("XLLM_LMMS_EVAL_VENV", "")).resolve()
    if not os.environ.get("XLLM_LMMS_EVAL_VENV") or not (venv / "bin" / "lmms-eval").exists():
        pytest.skip("no venv of the lmms-eval extra: `make test` builds it into .cache/lmms-eval-venv")
    block = readme_lmms_eval_block()
    assert "pip install '.[lmms-eval]'" in block  # how `make test` built the venv
    (command,) = [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()
                  if line.startswith("lmms-eval ")]
    adapter = dict(arg.split("=", 1) for arg in command[command.index("--model_args") + 1].split(","))["adapter"]
    output = command[command.index("--output_path") + 1]
    tasks = command[command.index("--tasks") + 1].split(",")

    work = tmp_path / "repo"  # the paths the README's command names, relative to the repository root
    make_model(tiny).eval().save_pretrained(work / adapter, stage=2)
    shutil.copytree(tiny / "data", work / ".cache" / "demo" / "data")
    include = command[command.index("--include_path") + 1]
    (work / include).parent.mkdir(parents=True)
    (work / include).symlink_to(ROOT / include)

    limit = 2  # one image's yes/no pair
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}", HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"))
    assert Path(shutil.which(command[0], path=env["PATH"])).parent == venv / "bin"
    run = subprocess.run(command + ["--limit", str(limit)], cwd=work, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-5000:])
    written = list((work / output).rglob("*_results.json"))
    assert len(written) == 1, ("lmms-eval wrote no results", run.stdout[-3000:], run.stderr[-5000:])
    results = json.loads(written[0].read_text())
    for task in tasks:
        assert results["n-samples"][task]["effective"] == limit
        scores = {k: v for k, v in results["results"][task].items() if k.endswith(",none") and "stderr" not in k}
        assert scores and all(0 <= v <= 1 or "score" in k for k, v in scores.items()), scores
