"""mmshiftkv.ops.weight_products (ShiftKV's one pass over q_proj) against a float64 recomputation.

Both paths (the compiled CPU pass and one torch.mv per vector) must give each product within float32
(or the weight dtype's) rounding, and the compiled pass the same bits for a vector whatever else it
is multiplied with, however many threads run and wherever the vectors lie in memory: ShiftKV
compares its fingerprint of the weight bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from mmshiftkv.ops import available, projection, weight_products

PATHS = ["compiled", "torch"] if available()["cpu"] else ["torch"]


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "torch":
        monkeypatch.setattr(projection, "runs_on", lambda device: False)
    return request.param


def _weight(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=generator) * 0.05 + 0.01).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("rows", "cols", "n"), [(1, 1, 1), (3, 7, 2), (70, 33, 5), (130, 96, 1), (257, 300, 9)]
)
def test_products_match_a_float64_recomputation(
    path: str, dtype: torch.dtype, rows: int, cols: int, n: int
) -> None:
    weight = _weight(rows, cols, dtype)
    vectors = torch.randn(n, cols, generator=torch.Generator().manual_seed(1)).to(dtype)
    products = weight_products(weight, vectors)
    assert products.dtype == torch.float32 and products.shape == (n, rows)
    exact = vectors.double() @ weight.double().T
    # Summation error of cols float32 products (2 cols u sum|w||x|), plus the torch path's final
    # rounding to the weight dtype.
    magnitude = vectors.double().abs() @ weight.double().abs().T
    unit = 2.0**-24 if path == "compiled" else torch.finfo(dtype).eps / 2
    assert ((products.double() - exact).abs() <= (2 * cols * 2.0**-24 + unit) * magnitude + 1e-30).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_vector_gets_the_same_bits_whatever_else_is_computed(dtype: torch.dtype) -> None:
    if not available()["cpu"]:
        pytest.skip("the compiled extension is not built")
    weight = _weight(300, 517, dtype)
    probe = torch.randn(517).to(dtype)
    alone = weight_products(weight, probe[None])[0]
    threads = torch.get_num_threads()
    try:
        for seed in range(3):
            others = torch.randn(seed + 1, 517, generator=torch.Generator().manual_seed(seed)).to(dtype)
            assert torch.equal(weight_products(weight, torch.cat([probe[None], others]))[0], alone)
            assert torch.equal(weight_products(weight, torch.cat([others, probe[None]]))[-1], alone)
            torch.set_num_threads(1 + seed % 2)
            buffer = torch.empty(2 * 517 + seed + 1, dtype=dtype)  # a misaligned copy
            shifted = buffer[seed + 1 : seed + 1 + 517]
            shifted.copy_(probe)
            assert torch.equal(weight_products(weight, shifted[None])[0], alone)
    finally:
        torch.set_num_threads(threads)


def test_bad_inputs_name_the_problem() -> None:
    weight = _weight(4, 6, torch.float32)
    with pytest.raises(ValueError, match="must share in"):
        weight_products(weight, torch.ones(2, 5))
    with pytest.raises(TypeError, match="weight must be float16, bfloat16 or float32"):
        weight_products(weight.double(), torch.ones(2, 6))
    with pytest.raises(TypeError, match="vectors must be floating point"):
        weight_products(weight, torch.ones(2, 6, dtype=torch.long))


@pytest.mark.parametrize(("rotary_dim", "table_batch"), [(128, 2), (64, 1), (2, 2)])
def test_compiled_rotation_matches_a_float64_rotation(rotary_dim: int, table_batch: int) -> None:
    if not available()["cpu"]:
        pytest.skip("the compiled extension is not built")
    generator = torch.Generator().manual_seed(3)
    # Strided states, as query_heads gives them: (batch, n, heads, head_dim) transposed.
    states = torch.randn(2, 37, 5, 128, generator=generator).transpose(1, 2)
    angles = torch.rand(table_batch, 1, 37, rotary_dim // 2, generator=generator) * 50
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    rotated = projection.rotate_half_compiled(states, cos, sin)
    assert rotated is not None and rotated.shape == states.shape and rotated.is_contiguous()
    half = rotary_dim // 2
    x1, x2 = states[..., :half].double(), states[..., half:rotary_dim].double()
    c, s = cos.double(), sin.double()
    expected = torch.cat(
        [x1 * c[..., :half] - x2 * s[..., :half], x2 * c[..., half:] + x1 * s[..., half:]], -1
    )
    # Two float32 products and one sum: within 3 roundings of the larger product.
    first = (x1 * c[..., :half]).abs() + (x2 * s[..., :half]).abs()
    second = (x2 * c[..., half:]).abs() + (x1 * s[..., half:]).abs()
    bound = 3 * 2.0**-24 * torch.cat([first, second], -1)
    assert ((rotated[..., :rotary_dim].double() - expected).abs() <= bound).all()
    assert torch.equal(rotated[..., rotary_dim:], states[..., rotary_dim:])


def test_compiled_rotation_leaves_other_inputs_to_torch() -> None:
    states, table = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    assert projection.rotate_half_compiled(states.half(), table.half(), table.half()) is None
    assert projection.rotate_half_compiled(states, table[..., :3], table[..., :3]) is None  # odd rotary_dim
    assert projection.rotate_half_compiled(states, table[:, :, :2], table[:, :, :2]) is None  # other n
    assert (
        projection.rotate_half_compiled(states.transpose(-1, -2).contiguous().transpose(-1, -2), table, table)
        is None
    )


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("rotary_dim", "period", "table_batch"), [(16, 3, 2), (8, 1, 1), (16, 12, 1)])
def test_compiled_affine_rotation_matches_a_float64_recomputation(
    base_dtype: torch.dtype, dtype: torch.dtype, rotary_dim: int, period: int, table_batch: int
) -> None:
    if not available()["cpu"]:
        pytest.skip("the compiled extension is not built")
    generator = torch.Generator().manual_seed(5)
    batch, n, heads, head_dim = 2, 12, 3, 16
    base = torch.randn(n, heads * head_dim, generator=generator).to(base_dtype)
    offset = torch.randn(batch, heads * head_dim, generator=generator)
    scale = torch.tensor([3.5, -0.25])
    angles = torch.rand(table_batch, period, rotary_dim // 2, generator=generator) * 50
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    rotated = projection.affine_rotate_half_compiled(base, offset, scale, cos, sin, heads, dtype)
    assert rotated is not None and rotated.shape == (batch, heads, n, head_dim) and rotated.dtype == dtype
    # float64: x = offset + scale * base split into heads, row i rotated by table row i % period.
    x = (offset.double()[:, None] + scale.double()[:, None, None] * base.double()).view(
        batch, n, heads, head_dim
    )
    x = x.transpose(1, 2)
    rows = torch.arange(n) % period
    c, s = cos.double()[:, None, rows], sin.double()[:, None, rows]
    half = rotary_dim // 2
    x1, x2 = x[..., :half], x[..., half:rotary_dim]
    products = [x1 * c[..., :half], x2 * s[..., :half], x2 * c[..., half:], x1 * s[..., half:]]
    expected = torch.cat([products[0] - products[1], products[2] + products[3], x[..., rotary_dim:]], -1)
    # One rounding of x, two products and a sum in float32 (within 4 roundings of the products'
    # magnitude; a passed feature within one of |x|), then one rounding to dtype.
    magnitude = torch.cat(
        [
            products[0].abs() + products[1].abs(),
            products[2].abs() + products[3].abs(),
            x[..., rotary_dim:].abs(),
        ],
        -1,
    )
    unit = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps / 2
    float32_error = 4 * 2.0**-24 * magnitude
    bound = float32_error + unit * (expected.abs() + float32_error)
    assert ((rotated.double() - expected).abs() <= bound).all()


def test_compiled_affine_rotation_leaves_other_inputs_to_torch() -> None:
    base, offset, scale = torch.randn(4, 8), torch.randn(1, 8), torch.ones(1)
    table = torch.randn(1, 2, 4)
    assert projection.affine_rotate_half_compiled(base, offset, scale, table, table, 3, torch.float32) is None
    assert (
        projection.affine_rotate_half_compiled(
            base, offset, scale, table[:, :, :3], table[:, :, :3], 2, torch.float32
        )
        is None
    )
    assert (
        projection.affine_rotate_half_compiled(
            base, offset, scale, table[:, :1].repeat(1, 3, 1), table[:, :1].repeat(1, 3, 1), 2, torch.float32
        )
        is None
    )  # period 3 of 4 rows
    assert (
        projection.affine_rotate_half_compiled(base, offset.half(), scale, table, table, 2, torch.float32)
        is None
    )
    assert projection.affine_rotate_half_compiled(base, offset, scale, table, table, 2, torch.float64) is None
    assert (
        projection.affine_rotate_half_compiled(
            base.requires_grad_(), offset, scale, table, table, 2, torch.float32
        )
        is None
    )


def test_compiled_affine_rotation_names_bad_inputs() -> None:
    if not available()["cpu"]:
        pytest.skip("the compiled extension is not built")
    op = torch.ops.mmshiftkv.affine_rotate_half
    base, offset, scale, table = torch.randn(4, 8), torch.randn(1, 8), torch.ones(1), torch.randn(1, 2, 4)
    with pytest.raises(RuntimeError, match="not a multiple of heads"):
        op(base, offset, scale, table, table, 3, torch.float32)
    with pytest.raises(RuntimeError, match="offset must be float32"):
        op(base, offset[:, :4], scale, table, table, 2, torch.float32)
    with pytest.raises(RuntimeError, match="scale must be float32"):
        op(base, offset, torch.ones(2), table, table, 2, torch.float32)
    with pytest.raises(RuntimeError, match="period dividing 4 rows"):
        op(base, offset, scale, torch.randn(1, 3, 4), torch.randn(1, 3, 4), 2, torch.float32)
    with pytest.raises(RuntimeError, match="dtype must be float16, bfloat16 or float32"):
        op(base, offset, scale, table, table, 2, torch.float64)
