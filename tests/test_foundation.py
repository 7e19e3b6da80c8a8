"""Foundation: namespace, typed recipes (bases, overrides, types, typos, missing values), run dirs, seeding."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch

from anyloom.config import ConfigError, build, config_diff, fingerprint, to_dict
from anyloom.recipes import available, load_recipe
from anyloom.recipes.schema import Recipe
from anyloom.training.metrics import MetricsLogger, read_metrics
from anyloom.training.optim import OptimConfig, lr_factor
from anyloom.training.run import RunDir
from anyloom.training.seed import seed_everything
from anyloom.weights import load_weights, save_weights

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_namespace_does_not_shadow_hf_tokenizers():
    # From the repo root, '' (cwd) is first on sys.path: our tokenizers/ must not hide Hugging Face's.
    code = "import transformers, tokenizers, anyloom.tokenizers; print(tokenizers.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "site-packages" in out.stdout and str(REPO_ROOT / "tokenizers") not in out.stdout


def test_components_import_as_anyloom_namespace():
    import anyloom.matcher.model
    import anyloom.recipes
    import anyloom.training.run
    import anyloom.world

    assert anyloom.recipes.__file__.startswith(str(REPO_ROOT / "recipes"))
    assert anyloom.training.run.__file__.startswith(str(REPO_ROOT / "training"))
    assert anyloom.world.__file__.startswith(str(REPO_ROOT / "world"))
    assert anyloom.matcher.model.__file__.startswith(str(REPO_ROOT / "matcher"))


@pytest.mark.parametrize("name", ["anyloom.anyloom", "anyloom.tests", "anyloom.docs", "anyloom.examples",
                                  "anyloom.scripts"])
def test_only_the_components_are_importable(name):
    import importlib

    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(name)


@pytest.mark.slow
def test_wheel_installs_and_imports_from_anywhere(tmp_path):
    # a non-editable wheel into a fresh environment; this environment's site-packages (torch etc.) is added to its
    # path by a .pth line, so its editable install (a finder that a site directory's .pth files activate) stays off
    wheel_dir, venv = tmp_path / "wheel", tmp_path / "venv"
    import shutil

    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info next to the sources
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(".*", "runs", "data_cache", "build", "*.egg-info",
                                                                     "__pycache__", "docs", "tests"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheel_dir), str(source)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    (wheel,) = wheel_dir.glob("anyloom-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    outer = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "torch").is_dir())
    Path(site, "outer_packages.pth").write_text(outer + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "-q", str(wheel)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr
    code = ("import anyloom, anyloom.tokenizers.registry, anyloom.transformer.kernels.rmsnorm, anyloom.world.dataset, "
            "anyloom.training.chain, anyloom.recipes\n"
            "from anyloom.recipes import load_recipe\n"
            "assert load_recipe('world').image_tokenizer.steps > 0\n"
            "print(anyloom.__file__, anyloom.tokenizers.registry.__file__)")
    out = subprocess.run([py, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert str(REPO_ROOT) not in out.stdout and "site-packages/anyloom" in out.stdout


def write(path, text):
    path.write_text(text)
    return path


def test_recipe_inheritance_and_overrides(tmp_recipes):
    write(tmp_recipes / "a.yaml", "run: {seed: 3}\noptim: {lr: 0.01, warmup_steps: 7}\ntrain: {steps: 50}\n")
    b = write(tmp_recipes / "b.yaml", "base: a.yaml\noptim: {lr: 0.02}\n")
    r = load_recipe(b, ["train.steps=9", "optim.betas=[0.8, 0.9]", "optim.schedule=wsd"])
    assert isinstance(r, Recipe)
    assert r.optim.lr == 0.02 and r.optim.warmup_steps == 7  # child over base, section merged
    assert r.run.seed == 3 and r.run.name == "b"  # name defaults to the recipe file's stem
    assert r.train.steps == 9 and r.optim.betas == (0.8, 0.9) and r.optim.schedule == "wsd"


def test_unknown_key_names_it_and_suggests(tmp_recipes):
    with pytest.raises(ConfigError, match=r"optim\.lrr.*optim\.lr'"):
        load_recipe("world", ["optim.lrr=1"])
    write(tmp_recipes / "typo.yaml", "train: {stpes: 3}\n")
    with pytest.raises(ConfigError, match=r"train\.stpes.*train\.steps"):
        load_recipe(tmp_recipes / "typo.yaml")
    with pytest.raises(ConfigError, match=r"unknown key 'optm'.*'optim'"):
        load_recipe("world", ["optm.lr=1"])


def test_wrong_types_fail_with_key():
    with pytest.raises(ConfigError, match=r"train\.steps: expected an integer"):
        load_recipe("world", ["train.steps=abc"])
    with pytest.raises(ConfigError, match=r"optim\.schedule: 'cosin' is not one of.*did you mean 'cosine'"):
        load_recipe("world", ["optim.schedule=cosin"])
    with pytest.raises(ConfigError, match=r"train: batch_size 10 is not divisible by grad_accum 3"):
        load_recipe("world", ["train.batch_size=10", "train.grad_accum=3"])
    assert load_recipe("world", ["optim.lr=1"]).optim.lr == 1.0  # int where float expected is fine
    # YAML 1.1 reads 3e-3 as a string; a float field still takes it, a word is still refused
    assert load_recipe("world", ["optim.lr=3e-3"]).optim.lr == 0.003
    with pytest.raises(ConfigError, match=r"optim\.lr: expected a number, got 'fast'"):
        load_recipe("world", ["optim.lr=fast"])


def test_missing_required_value():
    @dataclass(frozen=True)
    class Needs:
        path: str
        mode: Literal["a", "b"] = "a"

    with pytest.raises(ConfigError, match=r"missing required value 'data\.path'"):
        build(Needs, {}, prefix="data")
    assert build(Needs, {"path": "x"}).path == "x"


def test_base_cycle_and_unknown_recipe(tmp_recipes):
    write(tmp_recipes / "x.yaml", "base: y.yaml\n")
    write(tmp_recipes / "y.yaml", "base: x.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe(tmp_recipes / "x.yaml")
    with pytest.raises(ConfigError, match="no recipe named 'wrld'.*did you mean 'world'"):
        load_recipe("wrld")
    assert "world" in available()


def test_every_shipped_recipe_loads():
    """Each recipe in recipes/ (scale/ included) builds its typed sections: a misspelt key or a value of the wrong
    kind in a shipped recipe fails here, not minutes into someone's run."""
    shipped = sorted((REPO_ROOT / "recipes").rglob("*.yaml"))
    assert len(shipped) >= 10
    for path in shipped:
        load_recipe(path)


def test_run_dir_layout_and_metrics(tmp_path):
    recipe = load_recipe("world", [f"run.out_dir={tmp_path}", "run.name=t"])
    run = RunDir.from_config(recipe.run)
    run.write_recipe(recipe)
    for sub in ("checkpoints", "samples", "tb"):
        assert (tmp_path / "t" / sub).is_dir()
    assert run.read_recipe()["optim"]["lr"] == recipe.optim.lr
    logger = MetricsLogger(run)
    logger.log(1, loss=torch.tensor(2.5), lr=1e-3)
    logger.log(2, loss=float("nan"))
    logger.close()
    records = read_metrics(run.path)
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["loss"] == 2.5 and records[1]["loss"] == "nan"
    assert any(p.name.startswith("events.out.tfevents") for p in run.tensorboard.iterdir())
    assert run.stage("image_tokenizer").checkpoints.is_dir()


def test_seed_everything_is_deterministic():
    def draw():
        g = seed_everything(123)
        return torch.randn(4).tolist(), np.random.rand(2).tolist(), torch.randn(2, generator=g).tolist()

    assert draw() == draw()
    seed_everything(124)
    assert torch.randn(4).tolist() != draw()[0]


def test_weights_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    save_weights(tmp_path / "w", model.state_dict(), {"dim": 3}, vocab={"size": 7}, metadata={"step": 5})
    saved = load_weights(tmp_path / "w")
    assert saved.config == {"dim": 3} and saved.vocab == {"size": 7} and saved.metadata == {"step": "5"}
    for k, v in model.state_dict().items():
        assert torch.equal(saved.state_dict[k], v)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_weights(tmp_path)


def test_lr_schedules():
    cos = OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, 100, cos) == pytest.approx(0.1) and lr_factor(9, 100, cos) == pytest.approx(1.0)
    assert lr_factor(100, 100, cos) == pytest.approx(0.1)
    wsd = OptimConfig(warmup_steps=10, schedule="wsd", min_lr_ratio=0.0, decay_fraction=0.2)
    assert lr_factor(50, 100, wsd) == 1.0 and lr_factor(90, 100, wsd) == pytest.approx(0.5)


def test_fingerprint_is_stable_and_sensitive():
    a, b = load_recipe("world"), load_recipe("world", ["optim.lr=0.5"])
    assert fingerprint(a) == fingerprint(load_recipe("world")) and fingerprint(a) != fingerprint(b)


def test_added_field_keeps_old_fingerprints_until_it_leaves_its_neutral_value():
    from dataclasses import field

    from anyloom.config import added_field

    @dataclass(frozen=True)
    class Old:
        a: int = 1

    @dataclass(frozen=True)
    class New:
        a: int = 1
        b: float = added_field(0.0)
        c: tuple[int, ...] = added_field((2, 3))

    @dataclass(frozen=True)
    class NewDefault:  # the default moved away from the behaviour before the field existed
        a: int = 1
        b: float = added_field(0.5, neutral=0.0)

    @dataclass(frozen=True)
    class Outer:
        inner: Old | New = field(default_factory=Old)

    assert fingerprint(New()) == fingerprint(Old()) == fingerprint(New(c=[2, 3]))
    assert fingerprint(Outer(New())) == fingerprint(Outer(Old())) == fingerprint({"inner": {"a": 1}})
    assert fingerprint(New(b=0.5)) != fingerprint(Old()) and fingerprint(New(c=(2,))) != fingerprint(Old())
    assert fingerprint(NewDefault()) != fingerprint(Old())  # a changed default is not hidden
    assert fingerprint(NewDefault(b=0.0)) == fingerprint(Old())
    assert fingerprint(New(a=2)) != fingerprint(New())
    # a checkpoint's saved config against today's dataclass (training.checkpoint refuses a resume on a difference)
    assert config_diff(to_dict(Old()), New()) == [] and config_diff(to_dict(New()), New()) == []
    assert config_diff(to_dict(Old()), New(b=0.5)) == ["b"]
    assert config_diff({"a": 1, "z": 3}, New()) == ["z"]
    assert config_diff(to_dict(Outer(Old())), Outer(New(a=2, c=(1,)))) == ["inner.a", "inner.c"]


def test_train_script_rejects_typo_naming_key():
    env = dict(os.environ, PYTHONPATH="")
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "train.py"), "optim.lrr=1"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode != 0
    assert "optim.lrr" in out.stderr and "optim.lr'" in out.stderr
    json.dumps(out.stderr)


def _fields_named(tree, name: str, where: str = ""):
    """(path, value) of every field called ``name`` in a dataclass tree."""
    import dataclasses

    for f in dataclasses.fields(tree):
        value = getattr(tree, f.name)
        if f.name == name:
            yield f"{where}{f.name}", value
        if dataclasses.is_dataclass(value):
            yield from _fields_named(value, name, f"{where}{f.name}.")


def test_the_default_recipe_trains_fixed_steps_not_a_time_budget():
    budgets = dict(_fields_named(load_recipe("world"), "max_seconds"))
    assert {"train.max_seconds", "image_tokenizer.max_seconds", "audio_tokenizer.train.max_seconds"} <= set(budgets)
    assert all(v == 0 for v in budgets.values()), budgets  # 0: no budget; the step counts end every stage


def test_a_stage_error_is_one_line_not_a_traceback(monkeypatch, capsys, tmp_path):
    import train  # scripts/train.py

    def failing(recipe, run, log=print):
        raise ValueError("stage 'eval': scorer 'matcher' needs an image-text matcher")

    monkeypatch.setattr(train, "run_pipeline", failing)
    monkeypatch.delenv("ANYLOOM_TRACEBACK", raising=False)
    assert train.main(["--recipe", "world_tiny", f"run.out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: stage 'eval': scorer 'matcher'") and "Traceback" not in err


KNOBS = ["world_tiny", "GEN_ARGS", "--out", "--num", "--seed", "--candidates", "eval.limit", "OUT="]


def test_the_knobs_are_in_make_help_and_the_readme():
    helped = subprocess.run(["make", "-s", "help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60).stdout
    readme = (REPO_ROOT / "README.md").read_text()
    assert [k for k in KNOBS if k not in helped] == [] and [k for k in KNOBS if k not in readme] == []


PROCESS_WORDS = re.compile(r"\bsession[ _-]?\d+|\bissue ?#?\d+|\bworld_s\d+", re.IGNORECASE)


def test_the_product_speaks_of_itself_not_of_its_development():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60).stdout
    if not tracked:
        pytest.skip("not a git checkout")
    hits = []
    for name in tracked.splitlines():
        path = REPO_ROOT / name
        if name.startswith("tests/") or path.suffix in {".png", ".wav", ".tar", ".model", ".safetensors"}:
            continue
        if not path.is_file():
            continue
        text = path.read_text(errors="ignore")
        hits += [f"{name}: {m.group(0)}" for m in PROCESS_WORDS.finditer(text)] + (
            [f"file name {name}"] if PROCESS_WORDS.search(name) else [])
    assert hits == []
