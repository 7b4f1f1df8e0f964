"""Multi-process tests (gloo on CPU, 2 ranks spawned by :func:`tests.distributed.launcher.run_ranks`)."""
