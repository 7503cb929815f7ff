"""Suite-wide settings."""
import jax

# Tests that run the trainer's CLI in-process would switch on JAX's persistent compilation
# cache for the rest of the pytest process (train.cli.use_compilation_cache), and the
# server tests then compile from an engine thread and the main thread at once: with the
# cache on, full runs crashed there (SIGSEGV/SIGABRT inside jax 0.10.2's
# compile-and-write-cache path, three fresh runs in a row). Off for this process only;
# the subprocess tests keep their own caches.
jax.config.update("jax_enable_compilation_cache", False)
