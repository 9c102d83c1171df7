"""The course's pages do not rot: every command an exercise asks a student to run still parses (its
keys exist, its values pass the checks), and every function an exercise asks to rewrite still exists
with the test that grades it."""
import re
import shlex

import pytest

from lib.common import load_idea
from lib.config import parse_overrides
from tests.conftest import ROOT

COMMAND = re.compile(r"`(python (?:train\.py|sample\.py|hallucination\.py|bench\.py|-m study\.\w+)[^`]*)`")
GRADED = ("mae.md", "mim.md", "clip.md", "mlm.md", "gen.md", "vlm.md", "hallucination.md", "causes.md",
          "cures.md", "training.md", "own-data.md")
REWRITE = re.compile(r"\*\*Write `(\w+)` again\.\*\* Delete its body in `([\w/.]+)`")
GRADER = re.compile(r"`python -m pytest -q (tests/[\w.]+) -k (\"[^\"]+\"|\w+)`")


def exercises():
    """(chapter, the text of its exercises) for every chapter that has them."""
    out = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        text = page.read_text()
        if "## Exercises" in text:
            out.append((page.name, text.split("## Exercises", 1)[1].split("\n## ", 1)[0]))
    return out


def configs_of(argv):
    """The dataclasses a command's keys are checked against -> (script, [instances])."""
    import train
    from hallucination import StudyConfig
    from sample import SampleConfig
    from study.causes import MapConfig
    from study.cures import CureConfig
    words = [w for w in argv if not w.startswith("[")]  # optional parts written as [--key=value]
    if words[0] == "train.py":
        module = load_idea(words[1])
        tc, mc = train.build_configs(module, parse_overrides(words[2:], train.TrainConfig, module.Config))
        return [tc, mc]
    from bench import BenchConfig
    classes = {"sample.py": SampleConfig, "hallucination.py": StudyConfig, "study.causes": MapConfig,
               "study.cures": CureConfig, "bench.py": BenchConfig}
    script = words[1] if words[0] == "-m" else words[0]
    rest = words[2:] if words[0] == "-m" else words[1:]
    if script in ("sample.py", "bench.py"):  # IDEA first
        rest = rest[1:]
    return [classes[script](**parse_overrides(rest, classes[script]))]


def test_the_course_has_exercises_in_every_idea_chapter():
    chapters = {name for name, _ in exercises()}
    assert {"mae.md", "mlm.md", "vlm.md", "hallucination.md", "causes.md", "cures.md"} <= chapters


@pytest.mark.parametrize("chapter, text", exercises(), ids=[name for name, _ in exercises()])
def test_every_exercise_command_parses(chapter, text, monkeypatch):
    monkeypatch.chdir(ROOT)  # config files are named from the repository's root
    commands = [m.group(1) for m in COMMAND.finditer(text)]
    assert commands or chapter == "mlm.md" or REWRITE.search(text), chapter
    for command in commands:
        argv = shlex.split(command.replace("\n", " "))[1:]
        assert configs_of(argv), command


@pytest.mark.parametrize("chapter, text", exercises(), ids=[name for name, _ in exercises()])
def test_every_rewrite_names_a_function_and_the_tests_that_grade_it(chapter, text):
    rewrites = REWRITE.findall(text)
    graders = GRADER.findall(text)
    assert len(rewrites) >= (chapter in GRADED) and len(graders) >= len(rewrites), chapter
    for (function, path), (tests, selector) in zip(rewrites, graders):
        assert re.search(rf"^def {function}\(", (ROOT / path).read_text(), re.M), (chapter, function)
        source = (ROOT / tests).read_text()
        names = re.findall(r"^def (test_\w+)", source, re.M)
        for word in selector.strip('"').split(" or "):  # each part of -k selects a test of that file
            assert any(word in name for name in names), (chapter, word)
