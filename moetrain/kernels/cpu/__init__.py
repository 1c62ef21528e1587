"""The C++ CPU expert kernel (``moe.expert_impl=cpu_kernel``; ``csrc/``, JIT-built on first use), its router
pass, and the CPU process settings (threads, allocator, huge pages) in ``runtime``. Frozen: correctness
fixes only."""
