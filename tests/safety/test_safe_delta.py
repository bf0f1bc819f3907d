"""Safe Delta: the per-Linear algorithm against a slow float64 reference written here, its budget
and compensation properties, and ``secfwt safety safe-delta`` end to end on a tiny Llama."""

from __future__ import annotations

import pytest
import torch

from secfwt.cli import main
from secfwt.tuning.safe_delta import safe_delta_layer

from .conftest import save_tiny_llama


def _problem(seed: int, rows: int = 6, cols: int = 10, tokens: int = 40, samples: int = 4):
    """Aligned / tuned weights (rows, cols) and calibration inputs (tokens, cols) with one dead
    input column, and the Hessian (2/N) X^T X computed here."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    w1 = w0 + 0.3 * torch.randn(rows, cols, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, cols, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, cols)
    x[:, 3] = 0.0  # a dead input
    return w0, w1, x, (2.0 / samples) * (x.T @ x)


def _reference(w0, w1, h, s, block):
    """Safe Delta written out entry by entry (no vectorised selection, no lazy batches)."""
    rows, cols = w0.shape
    h = h.clone()
    for j in range(cols):
        if h[j, j] == 0:
            h[j, j] = 1.0
    h = h + 0.01 * torch.diag(h).mean() * torch.eye(cols, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    w = w0.clone()
    for b1 in range(0, cols, block):
        b2 = min(b1 + block, cols)
        entries = sorted(
            (1 / u[j, j].item() ** 2, i * (b2 - b1) + (j - b1), i, j)
            for i in range(rows)
            for j in range(b1, b2)
        )
        allowed = entries[: len(entries) - int(0.15 * len(entries))]
        budget = sum(e[0] for e in entries) / len(entries) * (s / 2) * (rows / 4096)
        keep, total = set(), 0.0
        for _, _, i, j in allowed:
            c = (w1[i, j] - w[i, j]).item() ** 2 / u[j, j].item() ** 2
            if total + c > budget:
                break
            total += c
            keep.add((i, j))
        for j in range(b1, b2):
            for i in range(rows):
                q = w1[i, j] if (i, j) in keep else w[i, j]
                err = (w[i, j] - q) / u[j, j]
                w[i, j] = q
                for k in range(j + 1, cols):
                    w[i, k] -= err * u[j, k]
    return w, u


@pytest.mark.parametrize(("s", "block"), [(40.0, 2048), (100.0, 4), (400.0, 3), (2000.0, 2048)])
def test_layer_matches_slow_reference(s, block):
    w0, w1, _, h = _problem(seed=1)
    got = safe_delta_layer(w0, w1, h, s=s, block=block)
    want, _ = _reference(w0, w1, h, s, block)
    assert 0 < got.kept < got.entries
    torch.testing.assert_close(got.weight, want, rtol=0, atol=1e-10)


def test_huge_budget_keeps_all_but_the_highest_curvature_15_percent_and_zero_keeps_none():
    w0, w1, _, h = _problem(seed=2)
    none = safe_delta_layer(w0, w1, h, s=0.0)
    assert none.kept == 0
    assert torch.equal(none.weight, w0)  # nothing kept: no error to propagate
    _, u = _reference(w0, w1, h, 0.0, 2048)
    curvature = 1 / torch.diag(u) ** 2  # (cols,)
    top = torch.argsort(curvature, stable=True)[-2:]  # 15% of 60 entries: the top 1.5 columns
    allr = safe_delta_layer(w0, w1, h, s=1e12)
    assert allr.kept == 60 - 9
    is_tuned = allr.weight == w1
    assert int(is_tuned.sum()) == 51
    assert not is_tuned[:, top[1]].any()  # the highest-curvature column: never kept
    assert is_tuned[:3, top[0]].all() and not is_tuned[3:, top[0]].any()  # ties by row order


@pytest.mark.parametrize("seed", range(5))
def test_kept_cost_respects_the_budget_and_fills_it(seed):
    w0, w1, _, h = _problem(seed=seed)
    s = 100.0  # with 6 rows the budget is scaled by 6 / 4096: about a third is kept
    got = safe_delta_layer(w0, w1, h, s=s)
    _, u = _reference(w0, w1, h, s, 2048)
    d2 = torch.diag(u) ** 2  # (cols,)
    cost = (w1 - w0) ** 2 / d2  # (rows, cols)
    budget = (1 / d2).mean() * (s / 2) * (6 / 4096)
    kept = got.weight == w1
    assert 0 < int(kept.sum()) < 51
    assert cost[kept].sum() <= budget
    # the next entry in curvature order would not fit
    order = sorted(range(60), key=lambda n: (1 / d2[n % 10].item(), n))
    assert {n for n in range(60) if kept.flatten()[n]} == set(order[: int(kept.sum())])
    nxt = order[int(kept.sum())]
    assert cost[kept].sum() + cost.flatten()[nxt] > budget


@pytest.mark.parametrize("seed", range(5))
def test_compensation_lowers_the_calibration_output_error(seed):
    """The paper's claim (Sec. 4.3): compensating the dropped delta brings the layer's outputs on
    the safety data closer to the aligned ones than keeping the same entries without it."""
    w0, w1, x, h = _problem(seed=seed)
    got = safe_delta_layer(w0, w1, h, s=100.0)
    kept = got.weight == w1
    plain = torch.where(kept, w1, w0)
    err = torch.linalg.norm(x @ (got.weight - w0).T)
    err_plain = torch.linalg.norm(x @ (plain - w0).T)
    assert err < err_plain  # 3-10% lower on these seeds: only later columns can compensate


def _hf_safe_delta_inputs(model_dir, adapter, tokenizer, samples):
    """The Hessian of every tuned module computed here from a full forward pass of the aligned
    model, and the tuned weights, to compare with what the command wrote."""
    from transformers import AutoModelForCausalLM

    from secfwt.data.calibration import calibration_pairs, calibration_texts
    from secfwt.models.adapters import load_peft_adapter

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lora = load_peft_adapter(adapter)
    names = sorted({k.rsplit(".", 1)[0] for k in lora.params})
    hs = {n: 0.0 for n in names}

    def hook(name):
        def f(_m, args, _o):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            hs[name] = hs[name] + (2.0 / samples) * x.T @ x

        return f

    for n in names:
        model.get_submodule(n).register_forward_hook(hook(n))
    with torch.no_grad():
        for text in calibration_texts(tokenizer, calibration_pairs(samples)):
            model(**tokenizer(text, add_special_tokens=False, return_tensors="pt"))
    w0 = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    w1 = {
        n: w0[n] + lora.scale * lora.params[f"{n}.lora_B"] @ lora.params[f"{n}.lora_A"]
        for n in names
    }
    return model, hs, w0, w1


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    from secfwt.models.adapters import save_peft_adapter

    root = tmp_path_factory.mktemp("safe-delta")
    base = save_tiny_llama(root / "base", smollm2_tokenizer, seed=3)
    model = AutoModelForCausalLM.from_pretrained(base)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(4)
    params = {}
    for i in range(2):
        for mod in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"):
            out, inp = shapes[f"model.layers.{i}.{mod}.weight"]
            params[f"model.layers.{i}.{mod}.lora_A"] = torch.randn(2, inp, generator=g)
            params[f"model.layers.{i}.{mod}.lora_B"] = 0.05 * torch.randn(out, 2, generator=g)
    adapter = save_peft_adapter(
        root / "adapter", params, base_model=str(base), scale=2.0, base_shapes=shapes
    )
    return base, adapter, shapes


def test_cli_end_to_end_merged_and_adapter(tuned, tmp_path, smollm2_tokenizer, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter, _ = tuned
    argv = ["safety", "safe-delta", str(base), "--adapter", str(adapter), "--calibration", "6"]
    assert main([*argv, "--budget", "200", "--out", str(tmp_path / "m")]) == 0
    assert "corrected 6 Linear weights on 6 calibration samples" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    aligned, hs, w0, w1 = _hf_safe_delta_inputs(base, adapter, smollm2_tokenizer, 6)
    for name, h in hs.items():
        want = safe_delta_layer(
            w0[name], w1[name], h, s=200.0
        )  # tiny rows: the budget scales with rows / 4096
        assert 0 < want.kept < want.entries
        torch.testing.assert_close(merged.get_submodule(name).weight, want.weight)
    aligned_state = aligned.state_dict()
    for key, value in merged.state_dict().items():
        if key.rsplit(".", 1)[0] not in hs:
            assert torch.equal(value, aligned_state[key]), key

    assert (
        main([*argv, "--budget", "200", "--format", "adapter", "--out", str(tmp_path / "a")]) == 0
    )
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), tmp_path / "a"
    ).merge_and_unload()
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=1e-6)


def _fail(argv, capsys) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("budget", ["-0.1", "nan", "inf"])
def test_bad_budget_is_refused_before_loading(tmp_path, capsys, budget):
    rc, err = _fail(
        ["safety", "safe-delta", str(tmp_path / "none"), "--adapter", str(tmp_path),
         "--out", str(tmp_path / "o"), f"--budget={budget}"],
        capsys,
    )  # fmt: skip
    assert rc == 2 and "--budget" in err


@pytest.mark.parametrize("n", ["0", "194"])
def test_bad_calibration_count_is_refused_before_loading(tmp_path, capsys, n):
    rc, err = _fail(
        ["safety", "safe-delta", str(tmp_path / "none"), "--adapter", str(tmp_path),
         "--out", str(tmp_path / "o"), "--calibration", n],
        capsys,
    )  # fmt: skip
    assert rc == 2 and "--calibration" in err and "193" in err


def test_calibration_is_disjoint_from_every_suite():
    from secfwt.data.calibration import calibration_pairs
    from secfwt.data.normalise import normalise_prompt
    from secfwt.data.suites import SUITE_NAMES, suite_prompts

    prompts = {normalise_prompt(p) for p, _ in calibration_pairs(193)}
    assert len(prompts) == 193
    for name in SUITE_NAMES:
        assert not prompts & {normalise_prompt(p) for p in suite_prompts(name)}, name


def test_adapter_for_another_model_is_refused(tuned, tmp_path, smollm2_tokenizer, capsys):
    from secfwt.models.adapters import save_peft_adapter

    base, _, shapes = tuned
    other = save_tiny_llama(tmp_path / "other", smollm2_tokenizer, hidden=16)
    a = torch.zeros(1, 16)
    wrong_shape = save_peft_adapter(
        tmp_path / "ws",
        {"model.layers.0.mlp.up_proj.lora_A": a, "model.layers.0.mlp.up_proj.lora_B": a.T.clone()},
        base_model=str(base),
        scale=1.0,
    )
    wrong_base = save_peft_adapter(
        tmp_path / "wb",
        {"model.layers.0.mlp.up_proj.lora_A": torch.zeros(1, 32),
         "model.layers.0.mlp.up_proj.lora_B": torch.zeros(64, 1)},
        base_model=str(other),
        scale=1.0,
    )  # fmt: skip
    head = save_peft_adapter(
        tmp_path / "head",
        {"lm_head.lora_A": torch.zeros(1, 32),
         "lm_head.lora_B": torch.zeros(shapes["lm_head.weight"][0], 1)},
        base_model=str(base),
        scale=1.0,
    )  # fmt: skip
    for folder, words in (
        (wrong_shape, "the adapter is for another model"),
        (wrong_base, "base_model_name_or_path"),
        (head, "'lm_head' is not a Linear of a decoder layer"),
        (tmp_path, "has no adapter_config.json"),
    ):
        rc, err = _fail(
            ["safety", "safe-delta", str(base), "--adapter", str(folder), "--calibration", "2",
             "--out", str(tmp_path / f"o-{folder.name}")],
            capsys,
        )  # fmt: skip
        assert rc == 3 and "--adapter" in err, err
        assert words in err, err
        assert not (tmp_path / f"o-{folder.name}").exists()
