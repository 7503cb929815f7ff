"""Suite-wide settings."""
import jax
import pytest

# Tests that run the trainer's CLI in-process would switch on JAX's persistent compilation
# cache for the rest of the pytest process (train.cli.use_compilation_cache); the subprocess
# tests keep their own caches. Off for this process.
jax.config.update("jax_enable_compilation_cache", False)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop every compiled program after each test module. Each XLA CPU executable holds
    memory mappings for its code, and one process compiling the whole suite's programs
    crashed late in full runs (SIGSEGV/SIGABRT inside XLA compilation in test_serve, four
    fresh runs in a row, with and without the persistent cache): most likely the kernel's
    limit on mappings per process (vm.max_map_count, 65530 here). Modules share compiled
    functions within themselves, not across, so this costs little."""
    yield
    jax.clear_caches()
