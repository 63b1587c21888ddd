"""State files written by an earlier ZeroSCache.save (tests/fixtures, format "zeros-lm-state/1") still load,
and the model continues from them exactly as it did when they were written."""

from pathlib import Path

import pytest
import torch

from zeros_lm import ZeroSCache, ZeroSForCausalLM

FIXTURES = Path(__file__).resolve().parent / "fixtures"
NAMES = ("softmax_zeros_conv", "zeros_norm_logit", "linear_softmax")


@pytest.mark.parametrize("name", NAMES)
def test_old_state_file_continues_as_recorded(name):
    model = ZeroSForCausalLM.from_pretrained(FIXTURES / name).eval()
    expected = torch.load(FIXTURES / f"{name}.expected.pt")
    cache = ZeroSCache.load(FIXTURES / f"{name}.state", model)  # also checks the weights' fingerprint
    prompt_mask = expected["prompt_mask"]
    assert cache.get_seq_length() == prompt_mask.shape[1]
    assert cache.num_tokens.tolist() == prompt_mask.sum(1).tolist()
    assert cache.metadata == {"pending": "[7]", "note": "fixture"}
    nxt = expected["next"]
    mask = torch.cat([prompt_mask, torch.ones_like(nxt)], dim=1)
    with torch.no_grad():
        logits = model(nxt, attention_mask=mask, cache=cache).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_old_state_file_equals_reading_the_prompt_again(name):
    """The recorded logits are those of the whole text read at once (so the fixture itself is right)."""
    model = ZeroSForCausalLM.from_pretrained(FIXTURES / name).eval()
    expected = torch.load(FIXTURES / f"{name}.expected.pt")
    ids = torch.cat([expected["prompt"], expected["next"]], dim=1)
    mask = torch.cat([expected["prompt_mask"], torch.ones_like(expected["next"])], dim=1)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits[:, -expected["next"].shape[1]:]
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-4, atol=1e-4)


def test_old_state_file_saves_again_and_reloads(tmp_path):
    """An old file loaded and saved again (the current format) gives the same continuation."""
    name = NAMES[0]
    model = ZeroSForCausalLM.from_pretrained(FIXTURES / name).eval()
    expected = torch.load(FIXTURES / f"{name}.expected.pt")
    ZeroSCache.load(FIXTURES / f"{name}.state", model).save(tmp_path / "again.state", model)
    cache = ZeroSCache.load(tmp_path / "again.state", model)
    mask = torch.cat([expected["prompt_mask"], torch.ones_like(expected["next"])], dim=1)
    with torch.no_grad():
        logits = model(expected["next"], attention_mask=mask, cache=cache).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-4, atol=1e-4)
