"""Loading of the compiled extension ``mmshiftkv._C`` and the call into ``torch.ops.mmshiftkv``.

The extension is the in-tree build (``pip install -e .``) when it loads into the running torch,
else the build for this torch in the op cache (made by ``python -m mmshiftkv.ops.build``), else
none: then :data:`LOAD_ERROR` says why and the ShiftKV press scores with the torch reference.

The op cache holds one folder per build key: the torch build, the kernels built (CPU, or CPU +
CUDA), the Python ABI and a hash of ``setup.py`` and ``csrc/``, so an edited source or another
torch never loads a stale build. Its root is ``$MMSHIFTKV_OP_CACHE``, else
``$XDG_CACHE_HOME/mmshiftkv/ops``, else ``~/.cache/mmshiftkv/ops``. A build includes the CUDA
kernel when this torch is a CUDA build and sees a GPU, unless ``FORCE_CUDA`` says otherwise
(``0``: CPU only; ``1``: CUDA required, as for ``setup.py``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import sysconfig
from pathlib import Path

import torch

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` (or `make build`) from the repository root, "
    "or, for another environment's torch, with `python -m mmshiftkv.ops.build` in that environment"
)


#: The checkout holding ``setup.py`` and ``csrc/`` (an installed wheel has neither, and its own build).
REPO = Path(__file__).resolve().parents[2]
SETUP = REPO / "setup.py"
SOURCES = REPO / "csrc"
#: File name of the extension for this Python (``_C.cpython-311-x86_64-linux-gnu.so``).
EXTENSION = "_C" + sysconfig.get_config_var("EXT_SUFFIX")


def cache_root() -> Path:
    """Folder holding one sub-folder per build key."""
    if os.environ.get("MMSHIFTKV_OP_CACHE"):
        return Path(os.environ["MMSHIFTKV_OP_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mmshiftkv" / "ops"


def builds_cuda() -> bool:
    """Whether a build for this torch includes the CUDA kernel (``FORCE_CUDA``, else a visible GPU)."""
    force = os.environ.get("FORCE_CUDA")
    if force in ("0", "1"):
        return force == "1"
    return torch.version.cuda is not None and torch.cuda.is_available()


def build_key() -> str | None:
    """Name of this torch's build in the cache, or None without sources to build from."""
    if not SETUP.is_file() or not SOURCES.is_dir():
        return None
    digest = hashlib.sha256()
    for path in [SETUP, *sorted(SOURCES.iterdir())]:
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    kernels = f"cuda{torch.version.cuda}" if builds_cuda() else "cpu"
    return f"torch{torch.__version__}-{kernels}-{sys.implementation.cache_tag}-{digest.hexdigest()[:16]}"


def cached_extension() -> Path | None:
    """The cached build for this torch and these sources, if it exists."""
    key = build_key()
    if key is None:
        return None
    path = cache_root() / key / EXTENSION
    return path if path.is_file() else None


#: The operators ``csrc/`` defines: an extension that lacks one was built from older sources.
OPERATORS = (
    "shiftkv_scores",
    "shiftkv_logit_max",
    "prompt_moments",
    "shiftkv_cpu_kernel",
    "weight_products",
    "rotate_half",
    "affine_rotate_half",
)


def missing_operators(namespace: object) -> list[str]:
    """The :data:`OPERATORS` that ``namespace`` (``torch.ops.mmshiftkv``) does not hold."""
    return [name for name in OPERATORS if not hasattr(namespace, name)]


def _load() -> tuple[object | None, str | None, str | None]:
    try:
        module = importlib.import_module("mmshiftkv._C")
    except (ImportError, OSError) as error:  # not built, or built against another torch
        in_tree = f"{type(error).__name__}: {error}"
    else:
        missing = missing_operators(torch.ops.mmshiftkv)
        if not missing:
            return module, module.__file__, None
        # Its operators are registered now: another build cannot load in this process.
        return None, None, f"{module.__file__} was built from older sources (it lacks {', '.join(missing)})"
    path = cached_extension()
    if path is None:
        return None, None, f"{in_tree}; the op cache has no build for torch {torch.__version__}"
    spec = importlib.util.spec_from_file_location("mmshiftkv._C", path)
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (ImportError, OSError) as error:
        cached = f"{type(error).__name__}: {error}"
        return None, None, f"{in_tree}; the cached build {path} does not load either ({cached})"
    sys.modules["mmshiftkv._C"] = module
    return module, str(path), None


#: The extension module (None when none loads), the file it was loaded from, and why none loads.
_EXTENSION, EXTENSION_FILE, LOAD_ERROR = _load()


if _EXTENSION is not None:

    @torch.library.register_fake("mmshiftkv::shiftkv_scores")
    def _shiftkv_scores_fake(
        proxies: torch.Tensor,
        keys: torch.Tensor,
        last_query: torch.Tensor,
        key_mask: torch.Tensor | None,
        n_groups: int,
        tau: float,
        scaling: float,
        anchor_weight: float,
        anchor_in_groups: bool,
        coverage: str,
        exclude_last_key: bool,
    ) -> torch.Tensor:
        # Output shape for tracing (torch.compile, meta tensors): (batch, kv_heads, seq_len) float32.
        return keys.new_empty(keys.shape[:3], dtype=torch.float32)


def available() -> dict[str, bool]:
    """Where the compiled op can run.

    Returns
    -------
    dict
        ``{"cpu": bool, "cuda": bool}``: ``cpu`` is True when the extension is built and imports;
        ``cuda`` when, in addition, it was built with its CUDA kernel and a GPU is visible.
        The torch reference backend runs everywhere.
    """
    built = _EXTENSION is not None
    with_cuda = built and bool(getattr(_EXTENSION, "WITH_CUDA", 0))
    return {"cpu": built, "cuda": with_cuda and torch.cuda.is_available()}


def runs_on(device: torch.device) -> bool:
    """Whether the compiled op has a kernel for tensors on ``device``."""
    return available().get(device.type, False)


def cpu_kernel(dtype: torch.dtype) -> str | None:
    """Which CPU kernel of the compiled op scores inputs of ``dtype``.

    The op's CPU kernels are compiled per ATen CPU capability and picked from
    ``torch.backends.cpu.get_cpu_capability()`` (so ``ATEN_CPU_CAPABILITY`` selects them too).

    Returns
    -------
    str or None
        ``"avx512_amx_bf16"`` (AVX-512 kernel, bfloat16 logits GEMM on AMX tiles through ATen's
        oneDNN brgemm, float32 accumulation: bfloat16 inputs on a CPU with AMX while oneDNN is
        enabled, ``torch.backends.mkldnn``), ``"avx512_bf16"`` (the same with AVX512-BF16 dot
        products), ``"avx512"``, ``"avx2"`` or ``"default"`` (float32 logits GEMM); None without the
        extension.
    """
    if _EXTENSION is None:
        return None
    return torch.ops.mmshiftkv.shiftkv_cpu_kernel(dtype)


def logit_max(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """The CPU op's logits GEMM alone: each row's max of ``scaling * queries @ keys.T``.

    Same kernel, key packing, row blocks and epilogue as :func:`shiftkv_scores_compiled` on the CPU;
    for the logits-floor benchmark and for testing the GEMM's rounding.

    Parameters
    ----------
    queries : torch.Tensor
        ``(n_rows, head_dim)`` CPU float16, bfloat16 or float32.
    keys : torch.Tensor
        ``(seq_len, head_dim)``, the dtype of ``queries``.
    scaling : float
        Logit scale.

    Returns
    -------
    torch.Tensor
        ``(n_rows,)`` float32.
    """
    if not runs_on(torch.device("cpu")):
        raise RuntimeError(f"the compiled ShiftKV op is unavailable ({LOAD_ERROR}); {BUILD_HINT}")
    return torch.ops.mmshiftkv.shiftkv_logit_max(queries.detach(), keys.detach(), float(scaling))


def shiftkv_scores_compiled(
    proxies: torch.Tensor,
    keys: torch.Tensor,
    last_query: torch.Tensor,
    *,
    n_groups: int,
    tau: float,
    scaling: float,
    anchor_weight: float,
    key_mask: torch.Tensor | None,
    anchor_in_groups: bool,
    coverage: str,
    exclude_last_key: bool,
) -> torch.Tensor:
    """Call ``torch.ops.mmshiftkv.shiftkv_scores`` (see :func:`mmshiftkv.ops.shiftkv_scores`)."""
    if not runs_on(proxies.device):
        reason = LOAD_ERROR or f"the extension was built without a kernel for {proxies.device.type}"
        raise RuntimeError(
            f"the compiled ShiftKV op is unavailable on {proxies.device} ({reason}); {BUILD_HINT}"
        )
    scores = torch.ops.mmshiftkv.shiftkv_scores(
        proxies.detach(),
        keys.detach(),
        last_query.detach(),
        key_mask,
        n_groups,
        float(tau),
        float(scaling),
        float(anchor_weight),
        anchor_in_groups,
        coverage,
        exclude_last_key,
    )
    return scores.masked_fill(non_finite_heads(keys, last_query, key_mask)[..., None], float("nan"))


def non_finite_heads(
    keys: torch.Tensor, last_query: torch.Tensor, key_mask: torch.Tensor | None
) -> torch.Tensor:
    """``(batch, kv_heads)`` bool: heads with a non-finite real key or last query.

    The reference scores those heads NaN (their softmax rows are NaN), and presses refuse NaN scores;
    the op's kernels take the row maximum and exponentials over finite logits only, so they would
    score them finite. A key is non-finite iff the sum of its elements times zero is (``0 * x`` is 0
    for finite ``x``, NaN for inf and NaN; the sum of zeros cannot overflow): one product and one
    sum, about ten times cheaper than ``isfinite(keys).all(-1)`` on a CPU, without a host sync.
    """
    bad_keys = ~torch.isfinite(keys.mul(0).sum(-1, dtype=torch.float32))  # (batch, kv_heads, seq_len)
    if key_mask is not None:
        bad_keys &= key_mask[:, None, :].to(bad_keys.device)
    batch, kv_heads = keys.shape[:2]
    bad_query = (~torch.isfinite(last_query).all(-1)).view(batch, kv_heads, -1).any(-1)
    return bad_keys.any(-1) | bad_query
