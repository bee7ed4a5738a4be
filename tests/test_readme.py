"""The README's Quick start stays true: two commands, and CI runs the test one verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quick_start_has_exactly_two_commands_and_ci_runs_the_test_one():
    install_and_run, install_and_test = _quick_start_commands()
    assert install_and_run.startswith("pip install -e .") and "solo train" in install_and_run
    assert "pytest" in install_and_test
    assert install_and_test in (ROOT / ".ci" / "run").read_text()


def test_main_job_config_exists():
    from solo.experiments import available

    install_and_run = _quick_start_commands()[0]
    name = install_and_run.split("solo train", 1)[1].split()[0]
    assert name in available()


def test_the_people_in_the_readme_exist_in_the_main_jobs_world():
    """The README's examples ask about people of the world the main job trains on (a person the
    world lacks would get an invented answer, or at best an abstention)."""
    from solo.data.world import World
    from solo.experiments import load_config

    text = (ROOT / "README.md").read_text()
    asked = set(re.findall(r"(?:Where was|When was) ([A-Z][a-z]+ [A-Z][a-z]+)", text))
    asked |= set(re.findall(r'--prompt "([A-Z][a-z]+ [A-Z][a-z]+) ', text))
    world = World.from_config(load_config("chat_world").data.world)
    names = {p.name for p in world.people}
    assert asked and asked <= names, asked - names
