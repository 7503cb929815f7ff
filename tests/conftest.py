"""Suite-wide settings."""
import jax
import pytest

# Tests that run the trainer's CLI in-process would switch on JAX's persistent compilation
# cache for the rest of the pytest process (train.cli.use_compilation_cache); the subprocess
# tests keep their own caches. Off for this process.
jax.config.update("jax_enable_compilation_cache", False)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop every compiled program after each test module. Full runs crashed late (SIGSEGV/
    SIGABRT inside XLA CPU compilation in test_serve, four fresh runs in a row) until this
    and the cache setting above were in place; since then CI and fresh local runs pass.
    The cause was not isolated: the process's memory mappings peaked at ~10.6k of the
    kernel's 65530 in a passing run, so it was not the mapping limit first suspected.
    Modules share compiled functions within themselves, not across, so this costs little."""
    yield
    jax.clear_caches()
