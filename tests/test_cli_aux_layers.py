"""Aux ids on the command line: ``info`` shows and checks the ids it is given, its JSON
holds a list or null (a reason goes in ``note``), and a model too shallow for the default
ids gets a message that names the flag to pass, ``--aux-layers``."""

from __future__ import annotations

import json

import pytest

from eagle3_target.cli import main
from eagle3_target.tiny import TinyModelConfig, make_tiny_model


@pytest.fixture(scope="module")
def shallow_model(tmp_path_factory):
    """4 layers: the default ids [1, N//2-1, N-4] = [1, 1, 0] are not distinct."""
    return make_tiny_model(tmp_path_factory.mktemp("shallow") / "m", TinyModelConfig(layers=4, vocab=300))


def _info(capsys, *args):
    code = main(["info", *args, "--json"])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else None), captured.err


def test_info_shows_the_ids_it_was_given(tiny_model_dir, capsys):
    code, info, _ = _info(capsys, "--model", str(tiny_model_dir), "--aux-layers", "0,2,7")
    assert code == 0
    assert info["aux_layer_ids"] == [0, 2, 7] and info["default_aux_layer_ids"] == [1, 3, 4]


def test_info_checks_the_ids_it_was_given(tiny_model_dir, capsys):
    code, _, err = _info(capsys, "--model", str(tiny_model_dir), "--aux-layers", "0,2,8")
    assert code == 2
    assert "--aux-layers [8] out of range" in err and "0..7" in err and "Traceback" not in err


def test_info_json_of_a_shallow_model_holds_null_and_a_note(shallow_model, capsys):
    code, info, _ = _info(capsys, "--model", str(shallow_model))
    assert code == 0
    assert info["aux_layer_ids"] is None and info["default_aux_layer_ids"] is None
    assert "pass --aux-layers explicitly" in info["note"]
    code, info, _ = _info(capsys, "--model", str(shallow_model), "--aux-layers", "0,1,3")
    assert info["aux_layer_ids"] == [0, 1, 3] and "note" not in info


def test_loading_a_shallow_model_names_the_flag(shallow_model, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"input_ids": [1, 2, 3]}\n')
    code = main(["forward", "--model", str(shallow_model), "--input", str(rows), "--out", str(tmp_path / "o.st")])
    err = capsys.readouterr().err
    assert code == 2 and "pass --aux-layers explicitly" in err and "aux_layer_ids" not in err
