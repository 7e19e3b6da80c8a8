"""The whole `make train` chain, shrunk: every stage produces sane outputs, reruns skip, the LM learns.

One recipe (recipes/world_tiny.yaml, made smaller still here) runs world -> tokenizers -> pre-tokenization ->
LM -> export -> eval in-process. A tiny world of a few captions is memorised by the LM, so a handful of
image->text generations on training items must come out exactly right.
"""

from __future__ import annotations

import json

import pytest

from anyloom.recipes import load_recipe
from anyloom.training.metrics import read_metrics
from anyloom.training.run import RunDir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from anyloom.training.chain import run_pipeline

    root = tmp_path_factory.mktemp("e2e")
    recipe = load_recipe("world_tiny", [f"run.out_dir={root}/runs", f"world.root={root}/world"])
    run = RunDir.from_config(recipe.run)
    run.write_recipe(recipe)
    lines: list[str] = []
    ctx = run_pipeline(recipe, run, log=lines.append)
    return recipe, run, ctx, lines


def test_every_stage_ran_and_wrote_its_outputs(tiny_run):
    recipe, run, ctx, _ = tiny_run
    assert [t["stage"] for t in ctx.timings] == list(recipe.pipeline.stages)
    for stage in ("text_tokenizer", "image_tokenizer", "audio_tokenizer"):
        assert (run.path / "stages" / stage / "tokenizer").is_dir(), stage
    for split in ("train", "test"):
        assert (run.path / "tokens" / split / "index.json").is_file()
    assert (run.path / "export" / "model.safetensors").is_file()
    matcher = json.loads((run.path / "stages" / "image_matcher" / "matcher_val.json").read_text())
    assert matcher["steps"] == recipe.image_matcher.steps and 0.0 <= matcher["val_top1"] <= 1.0
    assert "| lm |" in (run.path / "summary.md").read_text()
    assert any((run.samples / "eval").glob("t2i_test.png"))
    reply_text = (run.samples / "eval" / "any_0.txt").read_text()  # mixed replies to look at and listen to
    assert reply_text.startswith("prompt: ") and "\nreply: " in reply_text


def test_lm_learned(tiny_run):
    recipe, run, _, _ = tiny_run
    losses = [r["loss"] for r in read_metrics(run.path) if isinstance(r.get("loss"), float)]
    assert len(losses) >= 3
    assert losses[-1] < 0.6 * losses[0], losses  # memorising a few captions: the loss falls steeply


def test_eval_json_has_the_contract_names(tiny_run):
    _, run, _, _ = tiny_run
    scores = json.loads((run.path / "eval.json").read_text())
    for direction, metric in (("t2i", "attr_acc"), ("i2t", "exact"), ("a2t", "wer"), ("t2a", "asr_wer"),
                              ("t2a", "asr_wer_ground_truth")):
        assert isinstance(scores[direction][metric], float)
        assert isinstance(scores["compositional"][direction][metric], float)
    assert 0.0 <= scores["t2i"]["attr_acc"] <= 1.0


def test_memorised_captions_come_back_exactly(tiny_run):
    """image -> text on training items: a memorised world must caption its own images."""
    from anyloom.data.manifest import read_manifest
    from anyloom.evaluation.run_eval import PipelineModel
    from anyloom.generation.pipeline import load
    from anyloom.world.evaluate import eval_image_to_text, items_from_documents

    _, run, ctx, _ = tiny_run
    items = items_from_documents(read_manifest(ctx.artifacts["data"].train).documents[:8])
    scores = eval_image_to_text(PipelineModel(load(run.path)), items)
    assert scores["exact"] >= 0.75, scores


def test_rerun_skips_finished_stages(tiny_run):
    from anyloom.training.chain import run_pipeline

    recipe, run, _, _ = tiny_run
    stages = ["data", "text_tokenizer", "image_tokenizer", "image_matcher", "audio_tokenizer", "pretokenize"]
    again = load_recipe("world_tiny", [f"run.out_dir={run.path.parent}", f"world.root={recipe.world.root}",
                                       f"pipeline.stages=[{','.join(stages)}]"])
    ctx = run_pipeline(again, run, log=lambda _: None)
    assert all(t["elapsed"] < 20 and t["up_to_date"] for t in ctx.timings), ctx.timings
    assert "up to date" in ctx.timings[stages.index("image_matcher")]["result"]


def test_train_seed_seeds_the_lm_alone(tiny_run, monkeypatch):
    import anyloom.training.lm as lm
    from anyloom.training.chain import Context, stage_lm

    recipe, run, _, _ = tiny_run
    seen = {}

    def fake_train_lm(model_cfg, optim_cfg, train_cfg, parallel_cfg, run_dir, make_loader, vocab_json, seed, **kw):
        seen.update(seed=seed, loader_seed=make_loader(0, 1).seed)
        return lm.LMTrainResult(step=0, resumed_from=0, checkpoint=None)

    monkeypatch.setattr(lm, "train_lm", fake_train_lm)
    for overrides, expected in (([], recipe.run.seed), (["train.seed=7"], 7)):
        again = load_recipe("world_tiny", [f"run.out_dir={run.path.parent}", f"world.root={recipe.world.root}",
                                           *overrides])
        stage_lm(Context(again, run))
        assert seen == {"seed": expected, "loader_seed": expected}
    swapped = load_recipe("world_tiny", [f"run.out_dir={run.path.parent}", f"world.root={recipe.world.root}",
                                         "model.code_factors=[5,8,5,5]"])  # the right product, the wrong order
    with pytest.raises(ValueError, match="must be the image tokenizer's FSQ levels"):
        stage_lm(Context(swapped, run))


def test_export_is_up_to_date_only_for_the_very_checkpoint(tiny_run, tmp_path):
    # another training that reached the same step (the checkpoints moved away and the run trained afresh, or older
    # ones moved back, file times and all) must be exported again, not passed off by its path and step
    import os
    import shutil

    from anyloom.training.chain import Context, stage_export

    recipe, run, _, _ = tiny_run
    copy = RunDir(tmp_path / "run")
    shutil.copytree(run.checkpoints, copy.checkpoints, dirs_exist_ok=True)
    ctx = Context(recipe, copy)
    assert not stage_export(ctx).up_to_date
    assert stage_export(ctx).up_to_date
    state = max(copy.checkpoints.glob("step_*")) / "train_state.json"
    stat = state.stat()
    state.write_text(state.read_text().replace('"elapsed": ', '"elapsed": 1'))
    os.utime(state, (stat.st_atime, stat.st_mtime))  # older than the export
    assert not stage_export(ctx).up_to_date


def test_a_second_run_is_a_no_op_that_keeps_the_summary(tiny_run):
    from anyloom.training.chain import run_pipeline

    recipe, run, first, _ = tiny_run
    seconds = {t["stage"]: t["seconds"] for t in json.loads((run.path / "timings.json").read_text())}
    eval_bytes = (run.path / "eval.json").read_bytes()
    lines: list[str] = []
    again = run_pipeline(recipe, run, log=lines.append)
    assert all(t["up_to_date"] for t in again.timings), again.timings
    assert sum(t["elapsed"] for t in again.timings) < 60, again.timings  # seconds, not the first run's minutes
    assert {t["stage"]: t["seconds"] for t in again.timings} == {s: seconds[s] for s in recipe.pipeline.stages}
    assert "(up to date)" in again.timings[-1]["result"]  # the eval stage
    assert (run.path / "eval.json").read_bytes() == eval_bytes
    summary = (run.path / "summary.md").read_text()
    assert f"| lm | {seconds['lm']:.1f} |" in summary and "(up to date)" in summary


def test_a_partial_evaluation_never_replaces_the_full_one(tiny_run, capsys):
    import evaluate  # scripts/evaluate.py

    _, run, _, _ = tiny_run
    full = (run.path / "eval.json").read_bytes()
    sheet = (run.samples / "eval" / "t2i_test.png").read_bytes()
    args = ["--run", str(run.path), "eval.limit=2", "eval.splits=[test]", "eval.directions=[i2t]",
            "eval.perplexity=false", "eval.tokenizers=false"]
    assert evaluate.main(args) == 0
    assert (run.path / "eval.json").read_bytes() == full
    assert (run.samples / "eval" / "t2i_test.png").read_bytes() == sheet
    side = list((run.path / "evals").glob("*/eval.json"))
    assert len(side) == 1 and side[0].parent.name.startswith("directions=i2t,limit=2,perplexity=False,splits=test")
    assert json.loads(side[0].read_text())["i2t"]["n"] == 2
    out = capsys.readouterr().out
    assert "eval: test split, image->text (2 items)" in out and "the run's own eval.json is kept" in out
    assert evaluate.main(args) == 0 and "up to date" in capsys.readouterr().out  # the same again: kept, not redone
    assert evaluate.main(["--run", str(run.path)]) == 0  # the recipe's own settings: the run's result, up to date
    assert "kept" in capsys.readouterr().out and (run.path / "eval.json").read_bytes() == full


def test_an_interrupted_stage_counts_its_earlier_part(tiny_run, monkeypatch):
    import anyloom.training.chain as chain

    recipe, run, _, _ = tiny_run
    again = load_recipe("world_tiny", [f"run.out_dir={run.path.parent}", f"world.root={recipe.world.root}",
                                       "pipeline.stages=[data,export]"])
    before = json.loads((run.path / "timings.json").read_text())

    def interrupted(ctx):
        raise KeyboardInterrupt("stopped")

    monkeypatch.setitem(chain.STAGE_FUNCTIONS, "export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        chain.run_pipeline(again, run, log=lambda _: None)
    records = {r["stage"]: r for r in json.loads((run.path / "timings.json").read_text())}
    assert records["export"]["interrupted"] and len(records) == len(before)  # the other stages' records kept
    part = records["export"]["seconds"]
    monkeypatch.setitem(chain.STAGE_FUNCTIONS, "export", lambda ctx: chain.Outcome("exported"))
    ctx = chain.run_pipeline(again, run, log=lambda _: None)
    assert ctx.timings[-1]["seconds"] >= part and not ctx.timings[-1].get("interrupted")
