"""docs/options.md is generated from the options' definitions and must match them."""

from nanoebm.docs import OPTIONS_PAGE, render


def test_options_page_matches_the_code():
    assert OPTIONS_PAGE.read_text(encoding="utf-8") == render(), (
        "docs/options.md is out of date: run `python -m nanoebm.docs` to update it")
