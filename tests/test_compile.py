"""Compiled blocks: every DiT block traces without graph breaks and gives the eager numbers.

The inductor test compiles real code on the CPU (a C++ compiler is needed; about 10-60 s on two cores, most of it
the first C++ build), so it carries the ``compile`` mark: ``-m "not compile"`` leaves it out. The other tests use
the compiler's ``eager`` backend, which checks the same tracing (graph breaks) in about a second."""

import copy

import pytest
import torch

from helpers import constructed_edit
from step1x.checkpoints.loading import cast_model
from step1x.models import attention as attn
from step1x.models.compile import CompileError, check_compiler, compile_blocks, is_compiled, uncompile_blocks
from step1x.models.configs import TINY_DIT, with_version
from step1x.models.fp8_matmul import enable_fp8_matmul
from step1x.models.model import Step1XEdit
from step1x.models.speed import apply_speed_options
from step1x.sampling.denoise import denoise, make_noise
from step1x.sampling.regione import regione_denoise

F32 = dict(compute_dtype=torch.float32, device=torch.device("cpu"))


@pytest.fixture(autouse=True)
def _fresh_compiler():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _tiny():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Step1XEdit(with_version(TINY_DIT, "v1.1"), dtype=torch.float32).eval().requires_grad_(False)


def _block_inputs(model, txt_len=8, img_len=32, seed=3):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(1, img_len, 64, generator=g)
    txt = torch.randn(1, txt_len, 64, generator=g)
    vec = torch.randn(1, 64, generator=g)
    ids = torch.zeros(1, txt_len + img_len, 3)
    ids[0, txt_len:, 1] = torch.arange(img_len) // 8
    ids[0, txt_len:, 2] = torch.arange(img_len) % 8
    return img, txt, vec, model.rope(ids)


def _run_blocks(model, img, txt, vec, pe):
    with torch.no_grad():
        img2, txt2 = model.double_blocks[0](img, txt, vec, pe)
        return img2, txt2, model.single_blocks[0](torch.cat((txt2, img2), 1), vec, pe)


@pytest.mark.compile
def test_inductor_compiled_blocks_equal_eager_in_fp32():
    model = _tiny()
    inputs = _block_inputs(model)
    eager = _run_blocks(model, *inputs)
    assert compile_blocks(model, fullgraph=True) == 4 and is_compiled(model)
    compiled = _run_blocks(model, *inputs)
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.fixture()
def installed_backend(monkeypatch):
    """``auto`` preferring a backend whose package imports (json): choosing it probes the package, as auto does for
    flash and xformers on a GPU."""
    attn.register("probe_test", package="json", devices=("cpu",))(attn._sdpa)
    monkeypatch.setattr(attn, "AUTO_ORDER", ("probe_test", "sdpa"))
    yield "auto"
    attn._BACKENDS.pop("probe_test")


@pytest.mark.parametrize("fp8", [False, True])
def test_blocks_trace_whole_with_fp8_matmuls_and_a_probed_attention_backend(installed_backend, fp8):
    model = _tiny()
    if fp8:
        cast_model(model, torch.float32, "fp8_e4m3fn")
        enable_fp8_matmul(model)
    model.set_attention_backend(installed_backend)
    attn._import_error.cache_clear()  # the package probe runs while tracing
    inputs = _block_inputs(model)
    assert attn.resolve("auto", torch.device("cpu"), torch.float32).name == "probe_test"
    attn._import_error.cache_clear()
    eager = _run_blocks(model, *inputs)
    compile_blocks(model, fullgraph=True, backend="eager")
    for a, b in zip(_run_blocks(model, *inputs), eager, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_an_unsuitable_backend_falls_back_to_sdpa_inside_the_graph():
    model = _tiny()
    model.set_attention_backend("auto")
    for block in (*model.double_blocks, *model.single_blocks):
        block.attention_backend = "flash"  # needs CUDA: sdpa runs on the CPU, as in eager calls
    inputs = _block_inputs(model)
    eager = _run_blocks(model, *inputs)
    compile_blocks(model, fullgraph=True, backend="eager")
    for a, b in zip(_run_blocks(model, *inputs), eager, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def _sample(model, text, **kw):
    with torch.no_grad():
        return denoise(model, make_noise((1, 16, 8, 8), 0), *text, reference=make_noise((1, 16, 8, 8), 1), steps=5,
                       **F32, **kw)


@pytest.mark.parametrize("teacache", [0.0, 0.3])
def test_sampling_with_compiled_blocks_equals_eager_with_and_without_teacache(tiny_text, teacache):
    model = _tiny()
    eager = _sample(model, tiny_text, teacache=teacache)
    compiled = copy.deepcopy(model)
    compile_blocks(compiled, fullgraph=True, backend="eager")
    torch.testing.assert_close(_sample(compiled, tiny_text, teacache=teacache), eager, atol=1e-5, rtol=0)


def test_regione_runs_with_compiled_blocks_and_gives_the_eager_result(tiny_text):
    model = _tiny()
    noise, reference = constructed_edit()
    cond, uncond = tiny_text

    def run(m):
        with torch.no_grad():
            return regione_denoise(m, noise, cond, uncond, reference=reference, steps=12, **F32)

    eager = run(model)
    compile_blocks(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(run(model), eager, atol=1e-5, rtol=0)
    uncompile_blocks(model)
    assert not is_compiled(model)


def test_speed_options_check_fp8_before_compiling():
    model = _tiny()
    with pytest.raises(ValueError, match="fp8_matmul"):
        apply_speed_options(model, fp8_matmul=True, compile=True)
    assert not is_compiled(model)


# ------------------------------------------------------------------------- the compiler is there before compiling


def test_compile_is_refused_before_compiling_when_the_gpu_has_no_triton(monkeypatch):
    import torch.utils._triton as triton_probe

    monkeypatch.setattr(triton_probe, "has_triton", lambda: False)
    model = Step1XEdit(TINY_DIT)
    with pytest.raises(CompileError, match=r"no working Triton.*pip install triton.*turn compile off"):
        apply_speed_options(model, compile=True, device="cuda")
    assert not is_compiled(model)


def test_compile_is_refused_before_compiling_when_no_cpp_compiler_is_found(monkeypatch):
    import step1x.models.compile as compile_module

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(compile_module.shutil, "which", lambda name: None)
    model = Step1XEdit(TINY_DIT)
    with pytest.raises(CompileError, match=r"C\+\+ compiler.*turn compile off"):
        apply_speed_options(model, compile=True, device="cpu")
    assert not is_compiled(model)


def test_the_compiler_check_passes_where_a_compiler_is_found_and_skips_other_backends(monkeypatch):
    import step1x.models.compile as compile_module

    monkeypatch.setenv("CXX", "my-c++")
    monkeypatch.setattr(compile_module.shutil, "which", lambda name: "/bin/my-c++" if name == "my-c++" else None)
    check_compiler("cpu")
    monkeypatch.setattr(compile_module.shutil, "which", lambda name: None)
    check_compiler("cpu", backend="eager")  # the eager backend builds no kernels
    with pytest.raises(CompileError):
        check_compiler("cpu")
