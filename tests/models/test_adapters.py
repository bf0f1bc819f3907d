"""secfwt LoRA -> PEFT adapter folder -> PeftModel on a real (tiny, random) Llama checkpoint.

The adapter PEFT loads must compute secfwt's function: the base weights with
``W + scale * B @ A`` merged into every targeted module (a copy of the base loaded with
from_pretrained and edited by hand), in float64.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from secfwt.errors import ModelError
from secfwt.models.adapters import load_peft_adapter, save_peft_adapter

TOL = 1e-10  # float64 logits, two summation orders
RANK, SCALE = 4, 0.75
MODULES = (
    "model.layers.0.self_attn.q_proj",  # (64, 64)
    "model.layers.1.self_attn.v_proj",  # (32, 64): 2 key/value heads (GQA, as SmolLM2)
    "model.layers.0.mlp.down_proj",  # (64, 96)
)


def _save_tiny_llama(path: Path, **overrides: int) -> Path:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        **{
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 128,
            "max_position_embeddings": 64,
            "tie_word_embeddings": True,
            **overrides,
        }
    )
    tf.LlamaForCausalLM(config).save_pretrained(path)
    return path


def _load(path: Path):
    import transformers as tf

    return tf.LlamaForCausalLM.from_pretrained(path, dtype=torch.float64).eval()


def _shapes(model) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def _lora(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    params = {}
    for module in MODULES:
        out_f, in_f = shapes[f"{module}.weight"]
        params[f"{module}.lora_A"] = torch.randn(RANK, in_f, generator=g) / math.sqrt(RANK)
        params[f"{module}.lora_B"] = 0.1 * torch.randn(out_f, RANK, generator=g)  # nonzero
    return params


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("adapters")
    base_dir = _save_tiny_llama(root / "base")
    shapes = _shapes(_load(base_dir))
    params = _lora(shapes)
    folder = save_peft_adapter(
        root / "adapter", params, base_model=str(base_dir), scale=SCALE, base_shapes=shapes
    )
    return {"root": root, "base": base_dir, "shapes": shapes, "params": params, "folder": folder}


def test_peft_loads_the_adapter_and_computes_secfwts_lora(tiny: dict) -> None:
    from peft import PeftModel

    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    base = _load(tiny["base"])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    merged = _load(tiny["base"])
    state = merged.state_dict()
    for module in MODULES:
        a = tiny["params"][f"{module}.lora_A"].double()
        b = tiny["params"][f"{module}.lora_B"].double()
        state[f"{module}.weight"] += SCALE * b @ a  # x W^T + scale (x A^T) B^T
    merged.load_state_dict(state)
    peft_model = PeftModel.from_pretrained(_load(tiny["base"]), str(tiny["folder"])).eval()
    with torch.no_grad():
        want = merged(input_ids=ids).logits
        got = peft_model(input_ids=ids).logits
    assert float((want - base_logits).abs().max()) > 1e-2  # the adapter does change the model
    assert float((got - want).abs().max()) < TOL
    for module in MODULES:
        layer = peft_model.get_submodule(f"base_model.model.{module}")
        assert layer.scaling["default"] == SCALE  # exactly secfwt's scale
    prompt = ids[:1, :4]
    out = peft_model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 10)
    assert torch.equal(out, merged.generate(input_ids=prompt, max_new_tokens=6, do_sample=False))


def test_config_is_peft_lora_with_alpha_scale_times_r(tiny: dict) -> None:
    config = json.loads((tiny["folder"] / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == RANK
    assert config["lora_alpha"] / config["r"] == SCALE
    assert sorted(config["target_modules"]) == sorted(MODULES)
    assert config["base_model_name_or_path"] == str(tiny["base"])


def test_adapter_loads_back_into_secfwt_names(tiny: dict) -> None:
    adapter = load_peft_adapter(
        tiny["folder"], base_model=str(tiny["base"]), base_shapes=tiny["shapes"]
    )
    assert adapter.scale == SCALE and adapter.rank == RANK
    assert sorted(adapter.params) == sorted(tiny["params"])
    for name, value in tiny["params"].items():
        assert torch.equal(adapter.params[name], value)


@pytest.mark.parametrize("scale", [0.1, 1.0 / 3.0, 2.5, 1e-3])
@pytest.mark.parametrize("rank", [1, 3, 8, 12])
def test_scale_maps_to_alpha_over_r_exactly(tmp_path, scale: float, rank: int) -> None:
    params = {"m.lora_A": torch.zeros(rank, 5), "m.lora_B": torch.zeros(7, rank)}
    folder = save_peft_adapter(tmp_path, params, base_model="base", scale=scale)
    config = json.loads((folder / "adapter_config.json").read_text())
    quotient = config["lora_alpha"] / config["r"]  # PEFT's scaling
    assert abs(quotient - scale) <= math.ulp(scale)  # no float quotient is 0.1 with r = 3
    assert load_peft_adapter(folder).scale == quotient


def test_loading_for_another_base_model_names_the_field(tiny: dict) -> None:
    other = _save_tiny_llama(tiny["root"] / "other", hidden_size=48, intermediate_size=80)
    with pytest.raises(ModelError, match="base_model_name_or_path is"):
        load_peft_adapter(tiny["folder"], base_model=str(other))
    with pytest.raises(ModelError, match=r"model.layers.0.mlp.down_proj.weight of the base model"):
        load_peft_adapter(tiny["folder"], base_shapes=_shapes(_load(other)))


def test_bad_factors_are_refused_before_writing(tmp_path, tiny: dict) -> None:
    params = dict(tiny["params"])
    params["model.layers.0.self_attn.q_proj.lora_B"] = torch.zeros(64, 2)  # rank 2 vs A's 4
    with pytest.raises(ModelError, match=r"params: model.layers.0.self_attn.q_proj.lora_A is"):
        save_peft_adapter(tmp_path / "a", params, base_model="b", scale=1.0)
    params = dict(tiny["params"])
    del params["model.layers.1.self_attn.v_proj.lora_B"]
    with pytest.raises(ModelError, match="needs exactly lora_A and lora_B"):
        save_peft_adapter(tmp_path / "b", params, base_model="b", scale=1.0)
    params = {"model.layers.0.self_attn.o_proj_x.lora_A": torch.zeros(4, 64)}
    params["model.layers.0.self_attn.o_proj_x.lora_B"] = torch.zeros(64, 4)
    with pytest.raises(ModelError, match="is not a module of the base model"):
        save_peft_adapter(
            tmp_path / "c", params, base_model="b", scale=1.0, base_shapes=tiny["shapes"]
        )
    assert not any((tmp_path / d).exists() for d in "abc")


def test_unsupported_peft_options_are_refused(tmp_path) -> None:
    import peft

    params = {"m.lora_A": torch.zeros(2, 5), "m.lora_B": torch.zeros(7, 2)}
    folder = save_peft_adapter(tmp_path, params, base_model="base", scale=1.0)
    peft.LoraConfig(r=2, lora_alpha=2, target_modules=["m"], use_dora=True).save_pretrained(
        str(folder)
    )
    with pytest.raises(ModelError, match="adapter_config.json: use_dora is set"):
        load_peft_adapter(folder)


def test_tuned_base_tensors_go_in_as_modules_to_save(tmp_path, tiny: dict) -> None:
    """A tuned norm weight (not a LoRA target) loads into PeftModel and changes the logits as
    the same weight edited into the base model does; a tensor of a LoRA module, or of the wrong
    shape, is refused before anything is written."""
    from peft import PeftModel

    g = torch.Generator().manual_seed(5)
    norm = torch.rand(64, generator=g, dtype=torch.float64) + 0.5
    folder = save_peft_adapter(
        tmp_path / "with-norm",
        tiny["params"],
        base_model=str(tiny["base"]),
        scale=SCALE,
        base_shapes=tiny["shapes"],
        whole={"model.norm.weight": norm},
    )
    assert json.loads((folder / "adapter_config.json").read_text())["modules_to_save"] == [
        "model.norm"
    ]
    merged = _load(tiny["base"])
    state = merged.state_dict()
    for module in MODULES:
        state[f"{module}.weight"] += SCALE * (
            tiny["params"][f"{module}.lora_B"].double()
            @ tiny["params"][f"{module}.lora_A"].double()
        )
    state["model.norm.weight"] = norm
    merged.load_state_dict(state)
    peft_model = PeftModel.from_pretrained(_load(tiny["base"]), str(folder)).eval()
    ids = torch.randint(0, 128, (2, 9), generator=g)
    with torch.no_grad():
        assert (
            float((peft_model(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max())
            < 1e-6
        )
    for whole, pattern in (
        ({"model.layers.0.self_attn.q_proj.bias_x": torch.zeros(64)}, "the base model's is None"),
        ({"model.norm.weight": torch.zeros(32)}, r"model.norm.weight is \(32,\)"),
        ({"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64)}, "has LoRA factors"),
    ):
        with pytest.raises(ModelError, match=pattern):
            save_peft_adapter(
                tmp_path / "bad",
                tiny["params"],
                base_model="b",
                scale=1.0,
                base_shapes=tiny["shapes"],
                whole=whole,
            )
    assert not (tmp_path / "bad").exists()
