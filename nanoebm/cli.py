"""What both command-line programs share: the research code's key=value syntax, and one way to report bad input.

Bad input is one line on stderr and exit status 2, never a traceback; an unknown option comes with the closest
known ones.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from dataclasses import field
from pathlib import Path

KEY_VALUE = re.compile(r"^([A-Za-z_][A-Za-z0-9_.\-]*)=(.*)$", re.DOTALL)


class UsageError(Exception):
    """Bad input: reported on stderr as one message, exit status 2."""


def unk_token_field():
    """--unk_token, one meaning in both programs: the text may hold characters outside the model's vocabulary."""
    return field(default=None, metadata={"help": "Map characters outside the model's vocabulary to this vocabulary "
                                                 "character (e.g. ' ') instead of stopping with an error that lists "
                                                 "them."})


def check_unk_token(value) -> None:
    if value is not None and len(value) != 1:
        raise UsageError(f"--unk_token must be one character of the vocabulary (got {value!r})")


def closest(word: str, known, n: int = 3, quote: bool = False) -> str:
    """'; did you mean --a or --b?' for the known names closest to `word` ('' when none is close)."""
    close = difflib.get_close_matches(word, sorted(known), n=n, cutoff=0.6)
    close = [repr(c) for c in close] if quote else close
    return f"; did you mean {' or '.join(close)}?" if close else ""


def translate_research_syntax(argv, parser, renames, sections=()):
    """Rewrite the research code's `model.think_steps=4` words as `--think_steps 4`.

    A word is a key=value only where it cannot be the value of the preceding flag (`--prompt a=b` stays a prompt).
    Section prefixes in `sections` (`model.`, `train.`) are dropped and keys in `renames` mapped to their flag.
    Unknown keys raise UsageError with the closest known keys.
    """
    known = {action.dest for action in parser._actions} | set(renames)
    out, expects_value = [], False
    for word in argv:
        match = KEY_VALUE.match(word)
        if match and not expects_value:
            key, value = match.group(1).replace("-", "_"), match.group(2)
            head, _, tail = key.partition(".")
            if tail and head in sections:
                key = tail
            if key not in known:
                raise UsageError(f"unknown option {key!r} (in {word!r}){closest(key, known, quote=True)} (see --help)")
            out += [f"--{renames.get(key, key)}", value]
            continue
        out.append(word)
        action = parser._option_string_actions.get(word) if word.startswith("--") else None
        expects_value = action is not None and action.nargs is None  # an option that takes exactly one value
    return out


def flag_value(argv, name):
    """The last value given to --name in argv (either `--name v` or `--name=v`), or None."""
    value = None
    for i, word in enumerate(argv):
        if word == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
        elif word.startswith(f"--{name}="):
            value = word.split("=", 1)[1]
    return value


def raise_usage_error(message):
    """argparse's `error` for both parsers: a bad value is one message, not the usage block and exit."""
    raise UsageError(f"{message} (see --help)")


def reject_unknown(parser, remaining) -> None:
    """UsageError for command-line words no option takes, with the closest flags."""
    if not remaining:
        return
    options = [o for o in parser._option_string_actions if o.startswith("--") and "-" not in o[2:]]
    hints = []
    for word in remaining:
        hint = closest(word.split("=")[0], options, n=2)
        if hint:
            hints.append(f"{word!r}:{hint[1:]}")
    detail = " (" + "; ".join(hints) + ")" if hints else ""
    raise UsageError(f"unrecognized arguments: {' '.join(remaining)}{detail} (see --help)")


def given_values(parser, argv) -> dict:
    """{name: value} of the options the command line gives, typed by the parser; nothing else (no defaults)."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    namespace, remaining = parser.parse_known_args(argv)
    reject_unknown(parser, remaining)
    return vars(namespace)


def report(prog: str, error: BaseException, status: int = 2) -> int:
    """One line on stderr, whatever the message (a library's own may span several)."""
    message = re.sub(r"\s*\n\s*", " ", str(error).strip())
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return status


def model_options(names) -> dict:
    """{name: (help, aliases)} of entries of configuration_nanoebm.OPTIONS, the one definition of the model's options,
    read from that file's source: importing it imports torch (transformers' PreTrainedConfig does), which a program's
    --help does not need, and the table is plain data (a help made by code, the landscape's, is read from the imported
    table, only when asked for). tests/test_settings.py checks this against the imported table."""
    import ast
    import importlib.util

    origin = importlib.util.find_spec("configuration_nanoebm").origin
    tree = ast.parse(Path(origin).read_text(encoding="utf-8"))
    table = next(node.value for node in tree.body if isinstance(node, ast.Assign)
                 and [getattr(target, "id", None) for target in node.targets] == ["OPTIONS"])
    found = {}
    for call in table.elts:
        name = call.args[0].value
        if name not in names:
            continue
        try:
            help_text = ast.literal_eval(call.args[2])
        except ValueError:  # a help made by code (the landscape's, from its registry): only the imported table has it
            from configuration_nanoebm import OPTION

            help_text = OPTION[name].help
        aliases = next((ast.literal_eval(k.value) for k in call.keywords if k.arg == "aliases"), ())
        found[name] = (help_text, tuple(aliases))
    missing = set(names) - set(found)
    if missing:
        raise KeyError(f"configuration_nanoebm.OPTIONS has no {sorted(missing)}")
    return found
