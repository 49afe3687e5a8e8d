"""The backend's post-grad passes, as Inductor runs them (each pass has its own tests)."""

from halo_compile.passes.post_grad import HaloPostGradPasses


def test_cache_key_covers_the_chained_pass():
    class Other(HaloPostGradPasses):
        def uuid(self):
            return b"other"

    alone, chained = HaloPostGradPasses(), HaloPostGradPasses(then=Other())
    assert alone.uuid() == HaloPostGradPasses().uuid()
    assert alone.uuid() != chained.uuid()
