"""The backend's post-grad passes, as Inductor runs them (each pass has its own tests), and the
key under which Inductor's caches keep what they compiled."""

import shutil

import torch
from torch._dynamo.utils import counters

from halo_compile.passes import post_grad
from halo_compile.passes.post_grad import HaloPostGradPasses


def test_cache_key_covers_the_chained_pass():
    class Other(HaloPostGradPasses):
        def uuid(self):
            return b"other"

    alone, chained = HaloPostGradPasses(), HaloPostGradPasses(then=Other())
    assert alone.uuid() == HaloPostGradPasses().uuid()
    assert alone.uuid() != chained.uuid()


def test_source_digest_changes_with_any_module_of_the_three_packages(tmp_path, monkeypatch):
    files = post_grad.source_files()
    packages = {name.rsplit(".", 1)[0] for name in files}
    assert packages == {"halo_compile", "halo_compile.kernels", "halo_compile.passes"}
    # what decides the traced kernels and their launches, not only the post-grad passes
    assert {"halo_compile.kernels.triton_hadamard_quantize",
            "halo_compile.kernels.hadamard_quantize_launch",
            "halo_compile.kernels.triton_rows_quantize",
            "halo_compile.kernels.inductor_decompositions", "halo_compile.backend"} <= set(files)
    copies = {}
    for name, path in files.items():
        copies[name] = tmp_path / name
        shutil.copyfile(path, copies[name])
    monkeypatch.setattr(post_grad, "source_files", lambda: copies)

    def digest():
        post_grad.source_digest.cache_clear()
        return post_grad.source_digest()

    before = digest()
    assert digest() == before
    launch = copies["halo_compile.kernels.hadamard_quantize_launch"]
    launch.write_text(launch.read_text().replace("TRANSPOSE_CONFIG = TransposeConfig(64,",
                                                 "TRANSPOSE_CONFIG = TransposeConfig(32,", 1))
    changed = digest()
    post_grad.source_digest.cache_clear()  # the real files' digest for the tests after this
    assert changed != before


def test_graphs_compiled_by_other_halo_code_are_not_loaded_from_caches(tmp_path, monkeypatch):
    """Inductor's on-disk caches (FX graph, AOTAutograd) key on the Dynamo graph, where halo's
    ops are opaque: only the pass's uuid tells one version of halo's kernels from another."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 256))
    x = torch.randn(64, 256, requires_grad=True)

    def compile_and_run():
        torch._dynamo.reset()
        counters.clear()
        torch.compile(model, backend="halo", options={"format": "int8"})(x).sum().backward()
        return (counters["aot_autograd"]["autograd_cache_hit"],
                counters["aot_autograd"]["autograd_cache_miss"])

    with torch._inductor.config.patch(force_disable_caches=False):
        assert compile_and_run() == (0, 1)
        assert compile_and_run() == (1, 0)  # the same code: loaded
        monkeypatch.setattr(post_grad, "source_digest", lambda: b"another version")
        assert compile_and_run() == (0, 1)
