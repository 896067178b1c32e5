"""Print the README's supported models x presses table, measured on the tiny offline models.

    python scripts/models_table.py > /tmp/table.md

Every family of :data:`mmshiftkv.testing.ALL_FAMILIES` runs ``generate`` on a left-padded batch of two image
(or text) prompts under every press at a budget of 8 tokens per KV head; a cell is ✓ when the
press compressed every KV-holding layer to the budget (sliding-window layers keep their window; a
press built with its paper's allocator, VL-Cache, must hold exactly the layers' total) and FullKV
equals plain ``generate``, else it names the error. Families the library refuses are listed
with the reason their ``UnsupportedModelError`` gives.
"""

from __future__ import annotations

import warnings

import torch

from mmshiftkv.models import UnsupportedModelError, get_adapter
from mmshiftkv.registry import FULL, PRESSES, make_press
from mmshiftkv.testing import ALL_FAMILIES, QUESTION, REFUSED_FAMILIES, build_tiny_model, make_inputs

BUDGET = 8


def rope_kind(adapter, inputs_positions: torch.Tensor) -> str:
    parts = ["M-RoPE" if inputs_positions.dim() == 3 else "RoPE"]
    if adapter.rotation_style in ("pairwise", "interleaved"):
        parts.append("pairwise rotation")
    if any(getattr(m, "sliding_window", None) for m in adapter.attention_modules):
        parts.append("sliding layers")
    if adapter.n_layers < len(adapter.decoder.layers):
        parts.append(f"{adapter.n_layers}/{len(adapter.decoder.layers)} layers hold KV")
    return ", ".join(parts)


def row(family: str) -> str:
    model, processor = build_tiny_model(family)
    adapter = get_adapter(model)
    inputs = make_inputs(family, processor, [QUESTION, "Short?"])
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with make_press(FULL)(model), torch.no_grad():
        full = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    cells = ["✓" if torch.equal(plain, full) else "differs"]
    positions: list[torch.Tensor] = []
    for name in PRESSES:
        if name == FULL:
            continue
        extra = {"n_proxies": 64, "n_groups": 8} if name == "shiftkv" else {}
        press = make_press(name, budget=BUDGET, **extra)
        hook = adapter.rotary_emb.register_forward_pre_hook(
            lambda m, a, kw: positions.append(a[1] if len(a) > 1 else kw["position_ids"]), with_kwargs=True
        )
        try:
            with press(model), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.generate(**inputs, max_new_tokens=3, do_sample=False)
            windowed = {m.layer_idx for m in adapter.attention_modules if getattr(m, "sliding_window", None)}
            expected = torch.tensor(press.stats.prompt_tokens).clamp(max=BUDGET)[:, None]
            modules = enumerate(adapter.attention_modules)
            kept = [press.stats.kept[i] for i, m in modules if m.layer_idx not in windowed]
            if press.allocator is None:
                ok = all(torch.equal(layer, expected.expand_as(layer)) for layer in kept)
            else:  # a paper's own allocation (VL-Cache): the layers share exactly L x B per KV head
                ok = torch.equal(sum(kept), (len(kept) * expected).expand_as(kept[0]))
            cells.append("✓" if ok else "budget off")
        except Exception as error:  # the table reports failures instead of stopping
            cells.append(f"{type(error).__name__}")
        finally:
            hook.remove()
    cls = type(model).__name__
    return f"| {family} (`{cls}`) | {rope_kind(adapter, positions[0])} | " + " | ".join(cells) + " |"


def main() -> None:
    names = [name for name in PRESSES if name != FULL]
    print("| family (class) | positions | FullKV | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * (len(names) + 1))
    for family in ALL_FAMILIES:
        print(row(family), flush=True)
    for family in REFUSED_FAMILIES:
        model, _ = build_tiny_model(family)
        try:
            get_adapter(model)
            reason = "accepted (unexpected)"
        except UnsupportedModelError as error:
            reason = str(error).split(": ", 1)[1].split(". Presses need")[0]
        print(f"| {family} (`{type(model).__name__}`) | refused: {reason} |" + " |" * (len(names) + 1))


if __name__ == "__main__":
    main()
