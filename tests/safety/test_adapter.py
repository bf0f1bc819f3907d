"""``--adapter``: a PEFT folder is merged when it fits the model, refused with the field named
when it does not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from secfwt.errors import ModelError
from secfwt.safety.chat_model import load_chat_model

from .conftest import save_tiny_llama


def _save_adapter(base_dir: Path, out: Path, *, targets=("q_proj", "v_proj")) -> Path:
    """A LoRA adapter with random (non-zero) A and B on the model in ``base_dir``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=list(targets),
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    get_peft_model(base, config).save_pretrained(out)
    return out


def _edit_config(adapter: Path, **fields) -> None:
    path = adapter / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(fields)
    path.write_text(json.dumps(cfg))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapter_is_merged(tiny_chat_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = _save_adapter(tiny_chat_dir, tmp_path / "lora")
    chat = load_chat_model(str(tiny_chat_dir), adapter=adapter, device=torch.device("cpu"))
    assert chat.adapter is not None and chat.adapter["tensors"] == 2 * 2 * 2  # layers x q,v x A,B
    ids = torch.tensor([[1, 520, 9531, 198, 19556, 665]])
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_chat_dir), adapter
    )
    reference.eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_chat_dir)
    got = _logits(chat.model, ids)
    assert torch.allclose(got, _logits(reference, ids), atol=1e-5)
    assert not torch.allclose(got, _logits(plain, ids), atol=1e-3)  # the adapter did something


@pytest.mark.parametrize(
    ("hidden", "layers", "message"),
    [(48, 2, "has shape [4, 48], this model needs [4, 32]"), (32, 3, "has no place in this model")],
)
def test_adapter_of_another_shape_is_refused(
    tiny_chat_dir, tmp_path, smollm2_tokenizer, hidden, layers, message
):
    from transformers import AutoModelForCausalLM

    other = save_tiny_llama(tmp_path / "other", smollm2_tokenizer, hidden=hidden)
    if layers != 2:
        model = AutoModelForCausalLM.from_pretrained(other, num_hidden_layers=layers)
        model.save_pretrained(other)
    adapter = _save_adapter(other, tmp_path / "lora")
    _edit_config(adapter, base_model_name_or_path=str(tiny_chat_dir))  # claims the right base
    with pytest.raises(ModelError) as err:
        load_chat_model(str(tiny_chat_dir), adapter=adapter, device=torch.device("cpu"))
    assert "--adapter: tensor 'base_model.model.model.layers." in str(err.value)
    assert message in str(err.value)


def test_adapter_of_another_base_is_refused(tiny_chat_dir, tmp_path):
    adapter = _save_adapter(tiny_chat_dir, tmp_path / "lora")
    _edit_config(adapter, base_model_name_or_path="HuggingFaceTB/SmolLM2-360M-Instruct")
    with pytest.raises(ModelError, match="base_model_name_or_path = 'HuggingFaceTB/SmolLM2-360M"):
        load_chat_model(str(tiny_chat_dir), adapter=adapter, device=torch.device("cpu"))


def test_adapter_with_unknown_modules_is_refused(tiny_chat_dir, tmp_path):
    adapter = _save_adapter(tiny_chat_dir, tmp_path / "lora")
    _edit_config(adapter, target_modules=["w_qkv"])
    with pytest.raises(ModelError, match="target_modules = "):
        load_chat_model(str(tiny_chat_dir), adapter=adapter, device=torch.device("cpu"))


def test_folder_without_adapter_config_is_refused(tiny_chat_dir, tmp_path):
    with pytest.raises(ModelError, match="has no adapter_config.json"):
        load_chat_model(str(tiny_chat_dir), adapter=tmp_path, device=torch.device("cpu"))
