"""The model configuration is stated once, in ``ZeroSConfig``: every one of its fields (and a field
added to it, here in a subclass) reaches the training command (``--model.<field>``, the YAML
``model:`` section), the model, the checkpoint and the exported ``config.json`` with nothing else
to edit."""

from __future__ import annotations

import inspect
import json
import typing
from pathlib import Path

import pytest
import torch
import yaml
from test_train import print_config as print_train_config  # the training command's --print_config

from zeros_lm import ZeroSConfig
from zeros_lm import training
from zeros_lm.checkpoint import CHECKPOINT_KEY, config_fields, read_config, read_tokenizer
from zeros_lm.export import export_from_checkpoint

# The fields the training command links from the data module's tokenizer (not options of their own).
LINKED_FROM_DATA = {"vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"}
# A model small enough to build and export in a test; the other fields take changed values below.
SMALL = {"vocab_size": 320, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "chunk_size": 8}


# Fields whose valid values cannot be guessed from their type alone.
DOMAIN_VALUES = {"layer_types": [["full_attention"] * SMALL["num_hidden_layers"]],
                 "num_key_value_heads": [1]}  # a divisor of SMALL's 2 heads other than 2
# Fields that are None in the signature and derived from other fields when built (stored resolved).
DERIVED = {"intermediate_size", "num_key_value_heads", "head_dim"}


def candidates(name: str, default, hint) -> list:
    if name in SMALL:
        return [SMALL[name]]
    if name in DOMAIN_VALUES:
        return DOMAIN_VALUES[name]
    if isinstance(default, bool):
        return [not default]
    if typing.get_origin(hint) is typing.Literal:
        return [c for c in typing.get_args(hint) if c != default]
    if isinstance(default, float):
        return [default * 2]
    if isinstance(default, int):
        return [default + 1, default + 2, 2 * default + 2]
    if default is None:  # an optional size or token id
        return [3, 5, 96]
    return []


def changed_values(config_class=ZeroSConfig) -> dict:
    """A valid value other than the default for every field of ``config_class``, found from its
    signature (the first candidate the config accepts), so that a new field is covered without
    editing this test unless its values cannot be guessed from its type."""
    values = {}
    hints = typing.get_type_hints(config_class.__init__)
    for name, parameter in inspect.signature(config_class.__init__).parameters.items():
        if name == "self" or parameter.kind is parameter.VAR_KEYWORD:
            continue
        for value in candidates(name, parameter.default, hints.get(name)):
            try:
                config_class(**values, **{name: value})
            except ValueError:
                continue
            values[name] = value
            break
        else:
            raise AssertionError(f"no valid changed value for ZeroSConfig.{name}: add one to DOMAIN_VALUES")
    return values


def print_config(args: list[str], capsys) -> dict:
    return yaml.safe_load(print_train_config(args, capsys))


def export_config(lit_module, tokenizer, tmp_path: Path) -> dict:
    """Save a checkpoint the way a run does (the module's and the data module's parts), export it and
    return the exported config.json."""
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in lit_module.model.state_dict().items()}}
    lit_module.on_save_checkpoint(checkpoint)
    checkpoint["TextDataModule"] = {"zeros_lm_tokenizer_json": tokenizer.backend_tokenizer.to_str()}
    path = tmp_path / "step=0000001.ckpt"
    torch.save(checkpoint, path)
    export_from_checkpoint(str(path), str(tmp_path / "hf"))
    return checkpoint, json.loads((tmp_path / "hf" / "config.json").read_text())


def test_every_config_field_is_an_option_with_the_config_default(capsys):
    model = print_config([], capsys)["model"]
    defaults = ZeroSConfig()
    for name in config_fields():
        if name in LINKED_FROM_DATA:
            assert name not in model
            continue
        assert name in model, f"ZeroSConfig.{name} is not a --model option"
        if name not in DERIVED:
            assert model[name] == getattr(defaults, name), name
    # and nothing of PreTrainedConfig's own (id2label, problem_type, ...) leaks in
    own = set(inspect.signature(training.ZeroSLitModule.__init__).parameters) - {"self", "config"}
    own -= {"document_resets"}  # linked from --data.document_resets (it describes the blocks)
    assert set(model) == own | (set(config_fields()) - LINKED_FROM_DATA)


def test_every_config_field_reaches_the_model_the_checkpoint_and_the_export(capsys, tmp_path, tiny_tokenizer):
    values = changed_values()
    assert set(values) == set(config_fields())
    options = [a for name, v in values.items() if name not in LINKED_FROM_DATA for a in (f"--model.{name}", str(v))]
    printed = print_config(options, capsys)["model"]
    assert {k: printed[k] for k in values if k not in LINKED_FROM_DATA} == {
        k: v for k, v in values.items() if k not in LINKED_FROM_DATA}
    lit = training.ZeroSLitModule(**values)
    checkpoint, exported = export_config(lit, tiny_tokenizer, tmp_path)
    restored = read_config(checkpoint)
    for name, value in values.items():
        assert getattr(lit.model.config, name) == value, name
        assert checkpoint[CHECKPOINT_KEY]["config"][name] == value, name
        assert getattr(restored, name) == value, name
        assert exported[name] == value, name
    assert read_tokenizer(checkpoint).get_vocab() == tiny_tokenizer.get_vocab()


def test_a_misspelt_field_is_refused():
    with pytest.raises(TypeError, match="hiden_size is not a field of ZeroSConfig"):
        training.ZeroSLitModule(hiden_size=64)


class ConfigWithNewField(ZeroSConfig):
    """ZeroSConfig with one more field, written in this one place only."""

    def __init__(self, new_field: int = 5, **kwargs):
        self.new_field = new_field
        super().__init__(**kwargs)


def test_a_field_added_to_the_config_reaches_the_command_line_model_checkpoint_and_export(
    monkeypatch, capsys, tmp_path, tiny_tokenizer
):
    monkeypatch.setattr(training, "ZeroSConfig", ConfigWithNewField)
    model = print_config(["--model.new_field", "11"], capsys)["model"]
    assert model["new_field"] == 11
    lit = training.ZeroSLitModule(new_field=11, **SMALL)
    assert lit.model.config.new_field == 11
    checkpoint, exported = export_config(lit, tiny_tokenizer, tmp_path)
    assert checkpoint[CHECKPOINT_KEY]["config"]["new_field"] == 11
    assert read_config(checkpoint).new_field == 11
    assert exported["new_field"] == 11
