"""The README's commands, exactly as written and in the order written, on a fresh copy of the repository.

Training commands are shortened with flags appended at the end (fewer steps, fewer validation blocks), never changed
in meaning; `make train` runs its recipe (`python run_train.py`) in this environment; `make test` and `make test-all`
are the suites (the second includes this test), so they are not run.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, free_port

pytestmark = pytest.mark.slow  # about 170 s: every command a fresh process, most of them training

SHORT_TRAINING = ["--max_steps", "6", "--save_steps", "3", "--eval_steps", "3", "--logging_steps", "3",
                  "--eval_blocks", "4", "--eval_reading_chars", "200", "--disable_tqdm", "true",
                  "--dataloader_num_workers", "0"]
SHORTER_PATHS = {"checkpoint-1000": "checkpoint-3"}  # the checkpoint a shortened run saved
SHORT_GENERATION = ["--max_new_tokens", "20"]


def readme_commands():
    """(kind, text) for every line of a ```bash block and every ```python block, in README order."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for kind, body in re.findall(r"```(bash|python)\n(.*?)```", readme, flags=re.S):
        if kind == "python":
            yield kind, body
            continue
        for line in body.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()  # a trailing comment
            if line and not line.startswith("#"):
                yield kind, line


def as_run(line):
    """The argv that runs README line `line` here, or None for `make test` and `make test-all` (the suites)."""
    for long, short in SHORTER_PATHS.items():
        line = line.replace(long, short)
    words = shlex.split(line)
    if words[:2] in (["make", "test"], ["make", "test-all"]):
        return None
    if words[:2] == ["make", "train"]:  # the Makefile's recipe, in the environment under test
        words = ["python", "run_train.py"]
    if words[0] == "accelerate":
        assert words[1] == "launch", line
        words = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
                 "--dynamo_backend", "no", "--main_process_port", free_port(), *words[2:]]
    elif words[0] == "python":
        words[0] = sys.executable
    else:
        raise AssertionError(f"README command with an unknown program: {line}")
    if "run_train.py" in words:
        words += SHORT_TRAINING
    if "run_generate.py" in words:
        words += SHORT_GENERATION
    return words


def fresh_copy(tmp_path):
    """The files a clone has: tracked ones and new ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\n")
    copy = tmp_path / "nanoebm"
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    return copy


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_every_readme_command_works_as_written(tmp_path):
    commands = list(readme_commands())
    assert any(line.startswith("make train") for _, line in commands[:2])  # Quick start comes first
    copy = fresh_copy(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("NANOEBM_DATA", "PYTHONPATH")}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false",
               HF_MODULES_CACHE=str(tmp_path / "modules"))
    ran = 0
    for kind, text in commands:
        argv = [sys.executable, "-c", text] if kind == "python" else as_run(text)
        if argv is None:
            continue
        done = subprocess.run(argv, cwd=copy, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"README command failed: {text}\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr, text
        ran += 1
    assert ran >= 15
    # what the commands left: the quick start's model, a continued one with its lineage, an exact resume
    assert (copy / "out" / "model.safetensors").is_file() and not (copy / "out" / "checkpoints").exists()
    lineage = (copy / "out-more" / "README.md").read_text()
    assert "python run_train.py --model_name_or_path out" in lineage and "python run_train.py --max_steps 6" in lineage
    assert (copy / "out-ckpt" / "checkpoints" / "checkpoint-3").is_dir()
    card = (copy / "out-resumed" / "README.md").read_text()
    assert "up to its checkpoint of step 3, which the next run resumes" in card
    assert (copy / "plots" / "energy_descent.png").is_file() and (copy / "sample.json").is_file()
