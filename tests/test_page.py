"""run_generate.py --html: the page's numbers are the model's (a tiny trained model, real scoring), its size, the bad
input it refuses, and the page itself in a real browser (the system's Chromium, driven by Playwright)."""

import json
import shutil
import struct

import pytest
import torch

from conftest import make_model, run_cli as run, train_briefly
from tokenization_char import CharTokenizer

from nanoebm.analysis import position_stats, score_continuations
from nanoebm.scoring import score_reading
from run_generate import main

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LEARNING = ["--use_adaptation", "true", "--adapt_lr", 0.01, "--adapt_rule", "sgd", "--adapt_window", 16]


@pytest.fixture(scope="module")
def tokenizer(corpus_text):
    return CharTokenizer.from_corpus(corpus_text)


def trained(folder, tokenizer, corpus_text, seed, **config):
    ids = torch.tensor(tokenizer(corpus_text[:30000])["input_ids"])
    model = train_briefly(make_model(seed=seed, **config), ids, steps=20)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, corpus_text, tokenizer):
    """A tiny mixture model (block_size 32: a page of 80 characters already reads several windows)."""
    return trained(tmp_path_factory.mktemp("page-mixture"), tokenizer, corpus_text, 0, landscape="mixture",
                   think_lr=1.0, correction_scale=0.5)


def page_data(path):
    """The numbers the page carries: the JSON in its script element "data"."""
    html = path.read_text(encoding="utf-8")
    return json.loads(html.split('<script type="application/json" id="data">', 1)[1].split("</script>", 1)[0])


@pytest.fixture(scope="module")
def learning_page(tmp_path_factory, model_dir, corpus_text):
    """A page of a run that thinks (3 steps) and learns while reading: every quantity present."""
    path = tmp_path_factory.mktemp("page") / "page.html"
    prompt = corpus_text[1000:1060]
    code = main(["--model_name_or_path", str(model_dir), "--prompt", prompt, "--max_new_tokens", "20",
                 "--think_steps", "3", "--no_stream", "--html", str(path), *map(str, LEARNING)])
    assert code == 0
    return path, prompt


# ---------------------------------------------------------------------------------------------------------------
# the numbers


def test_page_numbers_are_the_models(learning_page, loaded, tokenizer):
    path, prompt = learning_page
    html = path.read_text(encoding="utf-8")
    assert "<script src" not in html and "<link" not in html and "http" not in html  # nothing to fetch
    data = page_data(path)
    (s,) = data["sections"]
    text = "".join(s["chars"])
    assert text.startswith(prompt) and len(text) == len(prompt) + 20 and s["prompt"] == len(prompt)
    assert s["steps"] == 3 and "--think_steps 3" in data["command"] and "--html" in data["command"]
    ids = torch.tensor(tokenizer(text)["input_ids"])
    scores = score_continuations(loaded, ids[None], 1, 3, steps=True)
    stats = position_stats(scores)
    p = torch.tensor(s["p"]) / 1e4  # (n, K + 1), step 0: System 1
    assert torch.allclose(p[:, 0], stats["p1"], atol=1e-4) and torch.allclose(p[:, -1], stats["p2"], atol=1e-4)
    kl = torch.tensor(s["kl"])
    assert (kl[:, 0] == 0).all() and kl[:, -1].mean() > 1e-6  # thinking moved the distributions, a little
    assert torch.allclose(kl[:, -1], stats["kl"], rtol=1e-3, atol=1e-8)
    assert torch.allclose(torch.tensor(s["J"], dtype=torch.float64), scores["trace"][0].double(), rtol=1e-6)
    top = torch.tensor(s["top"])  # (n, K + 1, 10): 5 ids, then their probabilities in 1e-4
    assert torch.equal(top[:, -1, 0], scores["logp2"][0].argmax(-1))
    assert s["ctx"] == scores["window_start"].tolist() and s["targets"] == ids[1:].tolist()
    # learning while reading: the gain is score_reading's static minus adapted NLL, the bars the adapted model's
    nll = score_reading(loaded, ids, adapt_window=16, think_steps=3, adapt_lr=0.01, adapt_rule="sgd")
    gain = torch.tensor(s["reading"]["gain"])
    assert torch.allclose(gain, nll["nll2_static"] - nll["nll2_adapted"], rtol=1e-3, atol=1e-6)
    assert gain.abs().max() > 0
    assert torch.allclose(torch.tensor(s["reading"]["p"]) / 1e4, (-nll["nll2_adapted"]).exp(), atol=2e-4)
    header = dict(s["header"])
    assert header["bits/char System 1"] == f"{float(stats['nll1'].mean()) / 0.6931471805599453:.4f}"
    assert header["learning while reading"] == "on" and "calibrated System 1" in " ".join(header)


def test_every_thinking_step_is_the_models(learning_page, loaded, tokenizer):
    """Step k of the slider is the logits after k descent steps, from a direct forward over the character's context
    (the first window: the context is the whole prefix)."""
    path, _ = learning_page
    (s,) = page_data(path)["sections"]
    ids = torch.tensor([tokenizer("".join(s["chars"]))["input_ids"]])
    for i in (0, 5, 20):
        assert s["ctx"][i] == 0
        with torch.no_grad():
            out = loaded(ids[:, :i + 1], use_cache=False, think_steps=3)
        logits = [out.system1_logits, *out.step_logits]
        expected = torch.stack([torch.softmax(v[0, -1], -1)[ids[0, i + 1]] for v in logits])
        assert torch.allclose(torch.tensor(s["p"][i]) / 1e4, expected, atol=1e-4)
        assert torch.allclose(torch.tensor(s["J"][i]), out.energy_trace[0, -1], atol=1e-5)


def test_a_system1_run_scores_thinking_for_the_page_and_says_learning_is_absent(capsys, tmp_path, model_dir):
    path = tmp_path / "page.html"
    code, _, err = run(capsys, "--model_name_or_path", model_dir, "--prompt", "ROMEO:", "--max_new_tokens", 10,
                       "--no_thinking", "--html", path)
    assert code == 0, err
    (s,) = page_data(path)["sections"]
    header = dict(s["header"])
    assert s["steps"] == 8 and header["think steps on this page"].startswith("8 (scored for this page only")
    assert s["reading"] is None and header["learning while reading"].startswith("off")
    assert "absent" in path.read_text(encoding="utf-8")


def test_html_chars_keeps_the_size_and_says_where_details_end(capsys, tmp_path, model_dir, corpus_text):
    """2,000 characters with 8 thinking steps stay under 2 MB; --html_chars 50 details the first 50 only."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(corpus_text[:2000], encoding="utf-8")
    full, short = tmp_path / "full.html", tmp_path / "short.html"
    for path, n in ((full, 2000), (short, 50)):
        code, _, err = run(capsys, "--model_name_or_path", model_dir, "--prompt_file", prompt, "--max_new_tokens", 1,
                           "--think_steps", 8, "--html", path, "--html_chars", n)
        assert code == 0, err
    assert full.stat().st_size < 2_000_000, full.stat().st_size
    data = page_data(full)
    assert len(data["sections"][0]["chars"]) == 2001 and data["rest"] == ""
    data = page_data(short)
    assert len(data["sections"][0]["chars"]) == 51 and len(data["rest"]) == 2000 - 50
    assert data["details"].startswith("Details for the first 50 of 2000 predicted characters")


def test_compare_writes_one_page_with_a_section_per_model(capsys, tmp_path, model_dir, corpus_text, tokenizer):
    linear = trained(tmp_path / "linear", tokenizer, corpus_text, 1, landscape="linear")
    path = tmp_path / "compare.html"
    code, out, err = run(capsys, "--compare", model_dir, linear, "--eval_blocks", 2, "--max_new_tokens", 4,
                         "--reading_chars", 40, "--html", path, "--html_chars", 60, "--adapt_lr", 0.01,
                         "--adapt_rule", "sgd", "--adapt_window", 16)
    assert code == 0, err
    sections = page_data(path)["sections"]
    assert [s["label"] for s in sections] == [model_dir.name, "linear"]
    assert sections[0]["chars"] == sections[1]["chars"] and len(sections[0]["chars"]) == 61
    for s in sections:
        assert s["reading"] is not None and "validation bits/char (the table)" in dict(s["header"])


# ---------------------------------------------------------------------------------------------------------------
# bad input: one line, exit status 2, nothing written


@pytest.mark.parametrize("where, message", [
    ("missing/page.html", "does not exist"),
    ("a_file.txt/page.html", "is a file, not a folder"),
    (".", "is a folder"),
])
def test_html_into_a_folder_that_cannot_take_it(capsys, tmp_path, model_dir, where, message):
    (tmp_path / "a_file.txt").write_text("x")
    before = sorted(tmp_path.iterdir())
    code, _, err = run(capsys, "--model_name_or_path", model_dir, "--prompt", "ROMEO:", "--max_new_tokens", 5,
                       "--output_json", tmp_path / "sample.json", "--html", tmp_path / where)
    assert code == 2 and "--html" in err and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert sorted(tmp_path.iterdir()) == before  # nothing written, not even the JSON


def test_html_chars_must_be_positive(capsys, tmp_path, model_dir):
    code, _, err = run(capsys, "--model_name_or_path", model_dir, "--html", tmp_path / "p.html", "--html_chars", 0)
    assert code == 2 and "--html_chars must be >= 1 (got 0)" in err and not (tmp_path / "p.html").exists()


# ---------------------------------------------------------------------------------------------------------------
# in a real browser


def system_chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Chromium from the system packages, headless, a fresh profile, driven by Playwright; skipped with the reason
    where either is missing."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python package is not installed "
                                                                 "(pip install -e '.[dev]')")
    executable = system_chromium()
    if executable is None:
        pytest.skip("no Chromium on this machine: apt-get install chromium (.ci/run installs it where it can)")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium-profile"), executable_path=executable, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1280, "height": 820})
        yield context
        context.close()


def open_page(browser, path):
    """The page loaded from disk, with every console error and every request not for the file itself recorded."""
    page = browser.new_page()
    page.errors, page.fetched = [], []
    page.on("console", lambda message: page.errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.route("**/*", lambda route: route.continue_() if route.request.url == path.as_uri()
               else (page.fetched.append(route.request.url), route.abort()))
    page.goto(path.as_uri())
    return page


def colours(page):
    return page.eval_on_selector_all("#text span.c", "spans => spans.map(s => s.style.backgroundColor)")


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 800 and height >= 400 and len(data) > 10_000, (width, height, len(data))


@pytest.mark.slow
def test_page_in_a_real_browser(browser, learning_page, tmp_path):
    path, _ = learning_page
    s = page_data(path)["sections"][0]
    page = open_page(browser, path)
    assert page.inner_text("#text").replace("↵", "") == "".join(s["chars"])
    assert page.locator("#text span.c").count() == len(s["targets"])
    # a click shows the character's candidates: System 1, System 2 and the adapted model, five each
    page.click('#text span.c[data-i="30"]')
    assert page.locator("#detail .systems > div").count() == 3
    assert page.locator("#detail .row").count() == 15
    assert page.locator("#detail svg polyline").count() == 1 and page.text_content("#context b") == s["chars"][31]
    # the slider recolours the text: KL at 0 steps is 0 everywhere, after 3 it is not
    after = colours(page)
    page.fill("#steps", "0")
    before = colours(page)
    assert len(set(before)) == 1 and before != after and page.inner_text("#stepsValue").startswith("0 of 3")
    # the gain from learning is one click away, and colours the text too
    page.click("button[data-q=gain]")
    assert page.locator("button[data-q=gain].on").count() == 1 and colours(page) != before
    screenshot = tmp_path / "page.png"
    page.screenshot(path=screenshot)
    assert_png(screenshot)
    assert page.errors == [] and page.fetched == []


@pytest.mark.slow
def test_compare_page_switches_models_in_a_browser(browser, capsys, tmp_path, model_dir):
    path, other = tmp_path / "page.html", shutil.copytree(model_dir, tmp_path / "other")
    code, _, err = run(capsys, "--compare", model_dir, other, "--eval_blocks", 2, "--max_new_tokens", 2,
                       "--reading_chars", 0, "--html", path, "--html_chars", 40)
    assert code == 0, err
    page = open_page(browser, path)
    assert page.locator("#models button").count() == 2 and page.locator("button[data-q=gain]").is_disabled()
    first = page.inner_text("#header")
    page.click("#models button[data-model='1']")
    assert page.inner_text("#header") != first and page.errors == [] and page.fetched == []


# ---------------------------------------------------------------------------------------------------------------
# Weights & Biases


def test_report_to_wandb_logs_the_page(capsys, tmp_path, model_dir, monkeypatch):
    """Offline, the run's folder holds the page as an HTML media file, byte for byte (nothing injected)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "nanoebm-test")
    path = tmp_path / "page.html"
    code, _, err = run(capsys, "--model_name_or_path", model_dir, "--prompt", "ROMEO:", "--max_new_tokens", 5,
                       "--html", path, "--report_to", "wandb")
    assert code == 0, err
    (logged,) = (tmp_path / "wandb").glob("offline-run-*/files/media/html/page_*.html")
    assert logged.read_text(encoding="utf-8") == path.read_text(encoding="utf-8")
    code, _, err = run(capsys, "--model_name_or_path", model_dir, "--report_to", "wandb")
    assert code == 2 and "--report_to wandb logs the page: give --html FILE too" in err
