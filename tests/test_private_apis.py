"""The private APIs of transformers that nanoebm's model and tokenizer still override or read (docs/DESIGN.md, "Private
APIs: model, tokenizer, data"). transformers renames them without notice (5.24 renamed `past_key_values` and broke
every copy), so each has a test here that fails with one message naming the API and the installed version, and no
other private API may creep in unlisted."""

import ast
import inspect
from pathlib import Path

import pytest
import torch
import transformers
from transformers import GenerationMixin, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils import PaddingStrategy

import modeling_nanoebm
import tokenization_char
from conftest import make_model
from tokenization_char import PAD_TOKEN, CharTokenizer

ROOT = Path(__file__).resolve().parents[1]
PYTHON_BACKEND = CharTokenizer.__mro__[1]  # transformers' PythonBackend (PreTrainedTokenizer)
WHERE = "docs/DESIGN.md, 'Private APIs: model, tokenizer, data'"

# (owner, private method, the parameters nanoebm passes or receives, what relies on it)
OVERRIDDEN = [
    (GenerationMixin, "_update_model_kwargs_for_generation", ("outputs", "model_kwargs", "is_encoder_decoder",
                                                              "num_new_tokens"),
     "NanoEBMForCausalLM counts the tokens a generate call added"),
    (PreTrainedModel, "_init_weights", ("module",), "NanoEBMPreTrainedModel's init (the hook for custom models)"),
    (PYTHON_BACKEND, "_update_trie", ("unique_no_split_tokens",), "CharTokenizer keeps <pad> out of the text trie"),
    (PreTrainedTokenizerBase, "_get_padding_truncation_strategies",
     ("padding", "truncation", "max_length", "pad_to_multiple_of", "verbose"),
     "CharTokenizer refuses a character as padding"),
    (PreTrainedTokenizerBase, "_save_pretrained", ("save_directory", "file_names", "legacy_format",
                                                   "filename_prefix"),
     "CharTokenizer writes tokenizer.json beside vocab.json"),
    (PYTHON_BACKEND, "_tokenize", ("text",), "CharTokenizer's characters (a slow tokenizer's hook)"),
    (PYTHON_BACKEND, "_convert_token_to_id", ("token",), "CharTokenizer's ids (a slow tokenizer's hook)"),
    (PYTHON_BACKEND, "_convert_id_to_token", ("index",), "CharTokenizer's characters (a slow tokenizer's hook)"),
    (PYTHON_BACKEND, "_convert_token_to_id_with_added_voc", ("token",), "CharTokenizer.convert_tokens_to_ids"),
]


def changed(api: str, problem: str, relies: str) -> str:
    return (f"transformers {transformers.__version__}: {api} {problem}; nanoebm relies on it ({relies}): adapt the "
            f"override, see {WHERE}")


@pytest.mark.parametrize("owner, name, params, relies", OVERRIDDEN, ids=[entry[1] for entry in OVERRIDDEN])
def test_each_overridden_private_method_still_exists_with_its_parameters(owner, name, params, relies):
    member = getattr(owner, name, None)
    assert callable(member), changed(f"{owner.__name__}.{name}", "is gone", relies)
    taken = inspect.signature(member).parameters
    missing = [p for p in params if p not in taken]
    assert not missing, changed(f"{owner.__name__}.{name}", f"no longer takes {missing} (its parameters: "
                                f"{list(taken)})", relies)


def own_private_methods(cls):
    """The private methods `cls` defines that one of its transformers / torch bases defines too: its overrides."""
    return {name for name, value in vars(cls).items()
            if name.startswith("_") and not name.startswith("__") and callable(value)
            and any(name in vars(base) for base in cls.__mro__[1:] if not base.__module__.startswith(("modeling_",
                                                                                                        "tokenization_char")))}


def test_no_other_private_api_is_overridden_or_read():
    """A new override or read of a private name must be listed here, tested above and in docs/DESIGN.md."""
    listed = {name for _, name, _, _ in OVERRIDDEN}
    classes = [modeling_nanoebm.NanoEBMPreTrainedModel, modeling_nanoebm.NanoEBMModel,
               modeling_nanoebm.NanoEBMForCausalLM, CharTokenizer]
    overridden = set().union(*(own_private_methods(cls) for cls in classes))
    assert overridden <= listed, f"private methods overridden but not listed: {sorted(overridden - listed)}"
    for path in ("modeling_nanoebm.py", "tokenization_char.py", "nanoebm/data.py"):
        tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
        imported = [f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and (node.module or "").split(".")[0] in ("torch", "transformers", "datasets")
                    for alias in node.names if alias.name.startswith("_")]
        read = [node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                and node.attr in ("_fingerprint", "keywords", "_gradient_checkpointing_kwargs")]
        assert not imported and not read, f"{path} imports {imported} and reads {read}: private, and unlisted"


def test_the_tokenizer_base_keeps_the_state_chartokenizer_reads(tmp_path):
    """CharTokenizer reads the base class's added-token tables and its trie's token set."""
    tok = CharTokenizer.from_chars(list("ab c"))
    relies = "CharTokenizer's added tokens"
    for name, kind in (("_added_tokens_decoder", dict), ("_added_tokens_encoder", dict)):
        assert isinstance(getattr(tok, name, None), kind), changed(f"{PYTHON_BACKEND.__name__}.{name}",
                                                                   f"is no longer a {kind.__name__}", relies)
    assert isinstance(getattr(getattr(tok, "tokens_trie", None), "_tokens", None), set), changed(
        f"{PYTHON_BACKEND.__name__}.tokens_trie._tokens", "is no longer a set", "CharTokenizer._update_trie")
    assert PAD_TOKEN not in tok.tokens_trie._tokens
    strategies = tok._get_padding_truncation_strategies(padding=True)
    assert len(strategies) == 4 and strategies[0] == PaddingStrategy.LONGEST, changed(
        "PreTrainedTokenizerBase._get_padding_truncation_strategies", f"returns {strategies!r}, not (padding "
        "strategy, truncation strategy, max_length, kwargs)", "CharTokenizer refuses a character as padding")
    saved = tok.save_pretrained(tmp_path)
    assert (tmp_path / tokenization_char.FAST_FILE).is_file() and str(tmp_path / tokenization_char.FAST_FILE) in \
        saved, changed("PreTrainedTokenizerBase._save_pretrained", "is no longer called by save_pretrained",
                       "CharTokenizer writes tokenizer.json")


def test_checkpointing_still_hands_the_backbone_its_checkpoint_function():
    """NanoEBMModel.run_block calls the `_gradient_checkpointing_func` that transformers sets on every module with a
    `gradient_checkpointing` flag (the integration point of custom models)."""
    model = make_model()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    backbone = model.transformer
    assert backbone.gradient_checkpointing and callable(getattr(backbone, "_gradient_checkpointing_func", None)), \
        changed(f"PreTrainedModel.{enable.__name__}", "no longer sets gradient_checkpointing and "
                "_gradient_checkpointing_func on the backbone", "NanoEBMModel.run_block")
    x = torch.randn(1, 3, 4, requires_grad=True)
    out = backbone._gradient_checkpointing_func(lambda t: t * 2, x)
    assert torch.equal(out, x * 2)
